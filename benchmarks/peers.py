"""Public peers run on a :class:`tda.problem.AttributionProblem`, for the benchmarks and the
cross-checks in the tests (the `baselines` extra; each peer is imported only when called).

kronfluence declares torchvision, a CUDA build on PyPI that this project keeps out, but never
imports it: install it with `pip install --no-deps kronfluence`.
"""

from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tda.problem import AttributionProblem


def kronfluence_scores(problem: AttributionProblem, strategy: str, damping: float,
                       batch_size: int = 512) -> torch.Tensor:
    """kronfluence's influence scores g_testᵀ (G̃ + λI)⁻¹ g_j / n [n_test, n_left_out], float64, for
    `strategy` ekfac | kfac at the absolute damping λ (classification). Its factors sample one
    label per example from the model (the true Fisher), whose expectation is the Gauss–Newton
    that tda's factors compute exactly."""
    from kronfluence.analyzer import Analyzer, prepare_model  # noqa: PLC0415 - optional: the baselines extra
    from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: PLC0415 - optional
    from kronfluence.task import Task  # noqa: PLC0415 - optional

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.distributions.Categorical(logits=logits.detach()).sample()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    task = ClassificationTask()
    model = prepare_model(copy.deepcopy(problem.model).eval(), task)
    train = TensorDataset(problem.x_train, problem.y_train)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("tda", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out)
        analyzer.fit_all_factors("factors", dataset=train, per_device_batch_size=batch_size,
                                 factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        query = TensorDataset(problem.x_test, problem.y_test)
        analyzer.compute_pairwise_scores("scores", "factors", query_dataset=query, train_dataset=train,
                                         per_device_query_batch_size=len(problem.x_test),
                                         per_device_train_batch_size=len(problem.left_out_indices),
                                         train_indices=problem.left_out_indices.tolist(),
                                         score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return scores.double() / problem.n_train  # kronfluence omits the 1/n
