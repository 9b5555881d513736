"""tda: final-model-only training data attribution.

Stages (Hydra apps of tda.cli: console scripts; three also as scripts at the repository root):
  tda-train          train.py      -> tda.stages.train           final model + left-out / test selection
  tda-further-train                -> tda.stages.further_train   the gold standard (further training)
  tda-attribute      attribute.py  -> tda.stages.attribute       a gradient method (method=further_training:
                                                                 the gold standard, as tda-further-train)
  tda-evaluate       evaluate.py   -> tda.stages.evaluate        similarity curves, tables, plots, W&B

Packages depend only downward, in the layers written down in pyproject.toml ([tool.importlinter]).
"""

__version__ = "0.1.0"
