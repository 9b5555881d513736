"""Datasets. Each loader is one module plus one `conf/dataset/*.yaml` (`_target_` = the loader
function); every loader returns a :class:`tda.data.base.DataBundle`."""

from tda.data.base import DataBundle, data_root

__all__ = ["DataBundle", "data_root"]
