"""Forgetting pipeline (paper Fig. 1/4, Tables 1, 6, 7): the same command locally and on a cluster.

python jobs/forgetting.py --config jobs/configs/forgetting.yaml [key=value ...]
ray job submit --working-dir . -- python jobs/forgetting.py --config jobs/configs/forgetting.yaml
"""

from pathlib import Path

from sdftlab.pipelines.graph import main

if __name__ == "__main__":  # vLLM and Ray spawn processes: keep the guard
    raise SystemExit(main(None, Path(__file__).parent / "configs" / "forgetting.yaml", __doc__))
