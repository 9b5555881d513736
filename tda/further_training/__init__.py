"""The further-training gold standard (SPEC §2)."""

# `further_training` settings that choose how or which part of the gold standard a job
# computes, not what it is: they are left out of the gold standard's directory key
# (tda.runs.further_training_key), so every shard and every engine writes into one directory.
EXECUTION_KEYS = ("engine", "max_runs_per_group", "sparse_input", "vmap", "shard_seeds", "left_out_shard", "progress_bar")
