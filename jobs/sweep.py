"""Sweep entry point: `python jobs/sweep.py jobs/configs/sweep_teacher_lr.yaml [key=value ...]`,
or the same after `ray job submit --working-dir . --`."""

import sys

from sdftlab.cli import main

if __name__ == "__main__":  # Ray and vLLM spawn processes: keep the guard
    raise SystemExit(main(["sweep", *sys.argv[1:]]))
