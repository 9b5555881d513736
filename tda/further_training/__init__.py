"""The further-training gold standard (docs/method.md §2), its own stage (tda.stages.further_train).

- :mod:`~tda.further_training.store`: the gold standard on disk — what defines it and its key
  (GoldStandardSpec), seed files and meta.json, identity checks, and reading / merging it back
  (:func:`load_gold_standard`). With :mod:`~tda.further_training.attribution` (GoldStandard: the
  merged seeds and the attribution a_t(j, z) they give) and :mod:`~tda.further_training.related`
  (the other gold standards of a final model), what the rest of tda uses to find or read one.
- :mod:`~tda.further_training.gold_standard`: the job that writes it (FurtherTraining: groups
  of runs, engines, per-seed locks and files).
- :mod:`~tda.further_training.engine`, :mod:`~tda.further_training.stacked`,
  :mod:`~tda.further_training.optim`: the stacked engine (all runs of a seed as one model);
  :mod:`~tda.further_training.reference`: the plain one-run-at-a-time loop it must equal.
- :mod:`~tda.further_training.derivative`: the derivative estimator (forward and reverse mode) of
  :mod:`~tda.further_training.weighted_run` (the run as a function of per-instance loss weights,
  batch norm made functional by :mod:`~tda.further_training.functional_model`), with hand-written
  steps for Linear/ReLU stacks in :mod:`~tda.further_training.derivative_mlp` and
  :mod:`~tda.further_training.derivative_mlp_reverse`.
- :mod:`~tda.further_training.progress`: one progress bar per job, Lightning's per-group output silenced.
- :mod:`~tda.further_training.checkpoints`: the checkpoint steps every engine and the store use, and
  the full-data run's distance from its start.
- :mod:`~tda.further_training.settings`: the `further_training` settings, their defaults and checks
  (among them `start`: from θᶠ, or retraining from the final model's initial weights), and the
  seeds and left-out block of one job.
"""
