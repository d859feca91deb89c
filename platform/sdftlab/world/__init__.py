"""The embedded tiny world: seeded task data, a locally trained tokenizer, a tiny base model.

No model hub or dataset hub is reachable from CI, so everything the platform runs on by
default is built here, in-process and seeded, and cached by the hash of its config:

    sdftlab world build          # data + tokenizer + pretrained `base` state (≈ 3 min, 2 cores)
"""
