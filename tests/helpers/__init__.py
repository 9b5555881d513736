"""Helpers shared by the tests (and the benchmarks, which put the repository root on sys.path)."""
