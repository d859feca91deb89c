"""Compression pipeline entry point: the same command locally and on a cluster.

python jobs/compression.py --config jobs/configs/compression.yaml
ray job submit --working-dir . -- python jobs/compression.py --config jobs/configs/compression.yaml
"""

from sdftlab.pipelines.compression import main

if __name__ == "__main__":  # vLLM and Ray spawn processes: keep the guard
    raise SystemExit(main())
