"""Evaluate stage: the methods against the gold standard (tda.stages.evaluate).
Usage: `python evaluate.py [overrides]`, the same as `tda-evaluate [overrides]` (tda.cli)."""

from tda.cli import evaluate

if __name__ == "__main__":
    evaluate()
