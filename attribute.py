"""Attribute stage: a method's scores or the gold standard (tda.stages.attribute).
Usage: `python attribute.py [overrides]`, the same as `tda-attribute [overrides]` (tda.cli)."""

from tda.cli import attribute

if __name__ == "__main__":
    attribute()
