"""The methods package's structure (its modules import each other as a tree, the influence
functions share one base class) and the progress lines of its long loops."""

from __future__ import annotations

import ast
import inspect
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import tda.methods
from tda.methods import progress
from tda.methods.arnoldi import Arnoldi
from tda.methods.base import Method
from tda.methods.cg import CG
from tda.methods.if_corrected import IFCorrected
from tda.methods.influence import InfluenceMethod
from tda.methods.kfac import EKFAC, KFAC
from tda.methods.lissa import LiSSA, LiSSAH
from tda.methods.trak import TRAK
from tda.problem import AttributionProblem

METHODS_DIR = Path(tda.methods.__file__).parent


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(tda modules imported at module level, tda modules imported inside a function or class)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in (n for n in names if n.split(".")[0] == "tda"):
            (top.add(name) if node in tree.body else nested.append(name))
    return top, nested


def test_methods_modules_import_each_other_as_a_tree():
    """No import cycle among tda/methods/*.py, and none hidden in an import inside a function."""
    graph = {}
    for path in METHODS_DIR.glob("*.py"):
        top, nested = _imports(path)
        assert not nested, f"{path.name} imports {nested} inside a function or class"
        graph[f"tda.methods.{path.stem}"] = {m for m in top if m.startswith("tda.methods.")}
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join(stack + (module,))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, stack + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())


@pytest.mark.parametrize("cls", [CG, IFCorrected, LiSSA, LiSSAH, Arnoldi, EKFAC, KFAC])
def test_influence_methods_share_one_base_that_owns_their_settings(cls):
    """Every influence-function method is an InfluenceMethod (a Method) and, built with its
    defaults, holds the shared settings the base checked."""
    assert issubclass(cls, InfluenceMethod) and issubclass(cls, Method)
    m = cls()
    assert {"curvature", "damping_multiple", "dtype", "batch_size", "chunk_size"} <= set(vars(m))
    assert m.curvature in ("gn", "hessian")
    # the config keys are the constructor's own parameters, not a pass-through
    assert not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    x = torch.randn(64, 5, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return AttributionProblem(model=model, task="classification", x_train=x, y_train=y, x_test=x[:3] + 0.1,
                              y_test=y[:3], left_out_indices=torch.arange(0, 64, 8), test_indices=torch.arange(3))


LONG_LOOPS = [
    ("cg", lambda: CG(damping_multiple=1.0, tol=1e-12), "cg: iteration 1 of at most 200: 0 of 3 columns converged"),
    ("cg_one_at_a_time", lambda: CG(damping_multiple=1.0, tol=1e-12, block=False), "cg: column 1 of 3, one at a time"),
    ("lissa", lambda: LiSSA(damping_multiple=10.0, depth=20, batch_size=16, scale=10.0),
     "lissa: scale 10, repeat 1 of 1, step 10 of 20"),
    ("arnoldi", lambda: Arnoldi(damping_multiple=1.0, n_iters=5, top_k=3), "arnoldi: step 1 of 5"),
    ("trak", lambda: TRAK(proj_dim=256, max_train_rows_per_chunk=16),
     "trak: projection column block 1 of 1, training row 16 of 64"),
    ("ekfac", lambda: EKFAC(damping_multiple=1.0, batch_size=16), "ekfac: factor pass, row 16 of 64"),
    ("ekfac_correction", lambda: EKFAC(damping_multiple=1.0, batch_size=16),
     "ekfac: eigenvalue correction pass, row 16 of 64"),
    ("kfac", lambda: KFAC(damping_multiple=1.0, batch_size=16), "kfac: factor pass, row 16 of 64"),
]


@pytest.mark.parametrize("make,line", [c[1:] for c in LONG_LOOPS], ids=[c[0] for c in LONG_LOOPS])
def test_long_loops_log_progress_per_block_without_changing_scores(problem, monkeypatch, caplog, make, line):
    """A progress line per block of work once the loop has run EVERY_SECONDS (0 here: every
    block); none for a problem this small at the default interval; the scores are the same."""
    with caplog.at_level(logging.INFO, logger="tda.methods"):
        quiet = make().scores(problem)
        assert line not in caplog.text
        monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
        logged = make().scores(problem)
    assert line in caplog.text
    assert torch.equal(quiet, logged)
