"""tda: final-model-only training data attribution.

Stages (tda.stages; each a thin Hydra entry point, tda.cli, and a script at the repository root):
  train.py, tda-train             -> tda.stages.train          final model + left-out / test selection
  tda-further-train               -> tda.stages.further_train  the gold standard (further training)
  attribute.py, tda-attribute     -> tda.stages.attribute      a gradient method's scores
  evaluate.py, tda-evaluate       -> tda.stages.evaluate       similarity curves, tables, plots, W&B
"""

__version__ = "0.1.0"
