"""tiermemd: the tiering daemon service (sampler -> policy -> mover per target)."""
