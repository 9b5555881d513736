"""Helpers shared by the test files (and the benchmarks, which put tests/ on sys.path): import them
as `helpers.<module>` (not `tests.helpers`: folktables installs a top-level `tests` package).
Shared fixtures are in tests/conftest.py."""
