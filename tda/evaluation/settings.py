"""The settings of the evaluate stage (the `evaluate` section), their defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tda.sections import Checks, Section, setting

# a gold-standard checkpoint: a named position or an index (negative counts from the end)
Checkpoint = Literal["first", "middle", "last"] | int


@dataclass(frozen=True)
class ExamplesSettings(Section):
    """`evaluate.examples`: the most helpful / harmful left-out instances shown in examples.md."""

    PATH = "evaluate.examples"
    n_test: int = setting(2, "the first n evaluated test instances", "0 shows no examples")
    test_positions: list[int] | None = setting(None, "or explicit positions in the evaluated test set, e.g. [0,5]")
    k: int = setting(3, "helpful and harmful instances shown per test instance",
                     "it is the number of helpful and harmful instances shown per test instance "
                     "(to show no examples, set evaluate.examples.n_test=0)")
    checkpoint: Checkpoint = setting("last", "gold-standard checkpoint: first | middle | last | int")
    centered: bool = setting(True, "gold standard mean-centred")

    def check(self, c: Checks) -> None:
        c.positive("k")
        c.non_negative("n_test")

    @property
    def shown(self) -> bool:
        """Whether any test instance is shown (n_test > 0 or explicit positions)."""
        return self.n_test > 0 or bool(self.test_positions)


@dataclass(frozen=True)
class EvaluateSettings(Section):
    """`evaluate`: what the evaluate stage computes and shows (not part of any key but the
    evaluation's own)."""

    PATH = "evaluate"
    centering: list[bool] = setting([True, False], "gold standard mean-centred (eq. 13) and not")
    seed_windows: list[int] = setting([1, 2, 5, 10, 20, 50, 100],
                                      "K of the peak-vs-seeds analysis (K > n_seeds is skipped)")
    sorted_checkpoints: list[Checkpoint] = setting(["first", "middle", "last"],
                                                   "sorted-score profiles: checkpoint positions")
    top_k: list[int] = setting([10, 100], "precision@k / recall of the gold standard's k most helpful and harmful "
                               "instances (capped at n_left_out)")
    top_k_recall_within: float = setting(0.1, "recall of the gold standard's top k within the method's top "
                                         "max(k, this fraction of the left-out instances)")
    examples: ExamplesSettings = setting(ExamplesSettings(), "most helpful / harmful left-out instances")
    compare: list[str] = setting([], "several experiments in one figure: override strings")
    compare_methods: list[str] | None = setting(None, "null: every method; or a list of labels")

    def check(self, c: Checks) -> None:
        centering = c.value("centering")
        if centering is not None and not centering:
            c.add("evaluate.centering=[] must be a non-empty list of booleans, e.g. [true,false]")
        windows = c.value("seed_windows")
        if windows is not None and not all(k > 0 for k in windows):
            c.add(f"evaluate.seed_windows={windows} must hold positive numbers of seeds, e.g. [1,2,5]")
        top_k = c.value("top_k")
        if top_k is not None and not all(k > 0 for k in top_k):
            c.add(f"evaluate.top_k={top_k} must hold positive numbers of instances, e.g. [10,100]")
        c.positive("top_k_recall_within")
        c.within("top_k_recall_within", 0, 1, " (a fraction of the left-out instances, e.g. 0.1)")
