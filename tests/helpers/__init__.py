"""Helpers shared by the test files: import them as `helpers.<module>` (pytest puts tests/ on
sys.path; not `tests.helpers`: folktables installs a top-level `tests` package). Shared fixtures
are in tests/conftest.py; what the tests share with the benchmarks (the peers) is in benchmarks/."""
