"""Speed benchmarks: each fast path side by side with its plain reference (and the public peers),
measured in one run on one machine, so that the ratios they report carry over. Run each from
the repository root as a module, e.g. `python -m benchmarks.methods --out rows.json`:

- `benchmarks.further_training`: the stacked further-training engine against the one-run loop;
- `benchmarks.derivative`: the derivative gold standard against the difference gold standard;
- `benchmarks.methods`: every method against its reference formulation and peers (the influence
  functions' cases are `benchmarks.methods_influence`, also run alone);
- `benchmarks.lds`: the retraining-LDS ground truth of the subset gold standard against dattri's
  retraining, and tda's LDS against dattri's metric (needs the `baselines` extra);
- `benchmarks.common`: the problems, the rows and the subprocess per measurement they share;
- `benchmarks.peers`: the public peers (kronfluence), also used by the cross-check tests.

benchmarks/results/ keeps the JSON output of runs that docs/ quotes.
"""
