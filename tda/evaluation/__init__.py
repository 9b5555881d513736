"""The evaluate stage's analyses (docs/method.md §4)."""
