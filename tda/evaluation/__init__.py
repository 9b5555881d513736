"""The evaluate stage's analyses (SPEC §4)."""
