"""The further-training gold standard (SPEC §2)."""

from tda.config import to_container

# `further_training` settings that choose how or which part of the gold standard a job
# computes, not what it is: they are left out of the gold standard's directory key
# (tda.runs.further_training_key), so every shard and every engine writes into one directory.
EXECUTION_KEYS = ("engine", "max_runs_per_group", "sparse_input", "vmap", "shard_seeds", "left_out_shard", "progress_bar")
# settings added after gold standards had been computed: at null they are left out of the key,
# so that existing gold-standard directories keep their names
NULL_IS_DEFAULT_KEYS = ("batchnorm_momentum",)


def gold_settings(ft) -> dict:
    """The settings that define the gold standard (what its directory key hashes)."""
    return {k: v for k, v in to_container(ft).items()
            if k not in EXECUTION_KEYS and not (k in NULL_IS_DEFAULT_KEYS and v is None)}
