"""Compression pipeline (paper Fig. 2/5, Tables 2–4): the same command locally and on a cluster.

python jobs/compression.py --config jobs/configs/compression.yaml [key=value ...]
ray job submit --working-dir . -- python jobs/compression.py --config jobs/configs/compression.yaml
"""

from pathlib import Path

from sdftlab.pipelines.graph import main

if __name__ == "__main__":  # vLLM and Ray spawn processes: keep the guard
    raise SystemExit(main(None, Path(__file__).parent / "configs" / "compression.yaml", __doc__))
