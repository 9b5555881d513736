"""Models. Each is one module plus one `conf/model/*.yaml`; every model subclasses
:class:`tda.models.base.TDAModel` so that final training, further training and the
attribution methods agree on which parameters are trainable."""

from tda.models.base import TDAModel, per_example_loss

__all__ = ["TDAModel", "per_example_loss"]
