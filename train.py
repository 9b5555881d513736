"""Train stage: the final model (tda.stages.train).
Usage: `python train.py [overrides]`, the same as `tda-train [overrides]` (tda.cli)."""

from tda.cli import train

if __name__ == "__main__":
    train()
