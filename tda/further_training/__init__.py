"""The further-training gold standard (SPEC §2)."""
