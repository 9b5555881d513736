"""tda: final-model-only training data attribution.

Stages (each a thin Hydra entry point at the repository root):
  train.py      -> tda.stages.train       final model + left-out / test selection
  attribute.py  -> tda.stages.attribute   gold standard (further training) or a gradient method
  evaluate.py   -> tda.stages.evaluate    similarity curves, tables, plots, W&B
"""

__version__ = "0.1.0"
