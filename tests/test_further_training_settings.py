"""The `further_training` section (tda.further_training.settings): shard settings that do not fit
the gold standard are refused before any work."""

from __future__ import annotations

import pytest
from helpers.config import compose_config

from tda.stages import attribute


def test_shard_settings_are_checked_before_work(tiny, pipeline):
    from tda.config import ConfigError

    with pytest.raises(ConfigError, match=r"shard_seeds contains \[7\], outside the seeds 0..1"):
        attribute(compose_config("attribute", tiny + ["method=further_training",
                                                      "further_training.shard_seeds=[0,7]"]))
    with pytest.raises(ConfigError, match=r"left_out_shard.count=9 splits the 8 left-out instances into more shards"):
        attribute(compose_config("attribute", tiny + ["method=further_training",
                                                      "further_training.left_out_shard.count=9"]))
    with pytest.raises(ConfigError, match=r"left_out_shard.index=2 must be in 0..1"):
        attribute(compose_config("attribute", tiny + ["method=further_training",
                                                      "further_training.left_out_shard.index=2",
                                                      "further_training.left_out_shard.count=2"]))
