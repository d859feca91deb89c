"""Small-model pipeline (paper Fig. 3/7, Table 5): the same command locally and on a cluster.

python jobs/small_model.py --config jobs/configs/small_model.yaml [key=value ...]
ray job submit --working-dir . -- python jobs/small_model.py --config jobs/configs/small_model.yaml
"""

from pathlib import Path

from sdftlab.pipelines.graph import main

if __name__ == "__main__":  # vLLM and Ray spawn processes: keep the guard
    raise SystemExit(main(None, Path(__file__).parent / "configs" / "small_model.yaml", __doc__))
