"""Forgetting pipeline entry point: the same command locally and on a cluster.

python jobs/forgetting.py --config jobs/configs/forgetting.yaml
ray job submit --working-dir . -- python jobs/forgetting.py --config jobs/configs/forgetting.yaml
"""

from sdftlab.pipelines.forgetting import main

if __name__ == "__main__":  # vLLM and Ray spawn processes: keep the guard
    raise SystemExit(main())
