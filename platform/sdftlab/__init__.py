"""sdftlab: degrade an LLM, recover it with self-distillation fine-tuning, measure why with CKA.

The library lives here; `jobs/` holds the `ray job submit` entry points that wire it.
See README.md for the two set-up commands and docs/ for the rest.
"""

__version__ = "0.1.0"
