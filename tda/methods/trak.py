"""TRAK with one model (Park et al. 2023; docs/method.md §3.7): FiMO has a single final model, so no
ensemble.

Features are random projections of per-example gradients of the output function f (the
margin logit_y − logsumexp_{c≠y} logit_c for classification, the output for regression):
φ_i = Pᵀ∇θ f(z_i) ∈ R^k, with P a seeded Gaussian matrix N(0, 1/k) [n_params, k]. With
Φ [n_train, k] the training features and the Gauss–Newton kernel K = ΦᵀΦ (+ λI):

    classification: score(z, j) = φ(z)ᵀ K⁻¹ φ_j · Q_j,   Q_j = 1 − p_y(z_j)  (= −dloss/df)
    regression:     score(z, j) = w(z) w_j · φ(z)ᵀ K⁻¹ φ_j,   w = dloss/df

This is the projected influence function (1/n) gᵀG⁻¹g_j with g = w∇f; for classification
the test-side factor w(z) = −Q(z) < 0 is dropped, as TRAK does, which rescales each test
row by a positive number; the orientation is the gold standard's (positive = helpful).
With λ = 0 and K singular (k > n_train), K⁻¹ is the pseudo-inverse.

P is generated per parameter tensor and per block of `block_columns` columns from
(seed, tensor index, block index), so the features do not depend on chunk sizes. For a
linear layer with sparse inputs (one-hot tabular data) the projection of b_i a_iᵀ is formed
from the non-zero inputs only: φ_i = Σ_{o,d} b_io a_id P[(o, d), :].
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from tda.config import ConfigError
from tda.methods.base import Method
from tda.methods.checks import check_factored, optional_positive_int, positive_int
from tda.methods.gradients import DenseGrads, FactoredGrads, compute_grads, iter_grad_chunks, margin_target
from tda.methods.layout import ParamLayout
from tda.methods.progress import Progress
from tda.problem import AttributionProblem

log = logging.getLogger(__name__)

BLOCK_COLUMNS = 128
SPARSE_DENSITY = 0.25  # inputs at most this dense are projected through their non-zeros


def projection_block(seed: int, tensor_index: int, block: int, rows: int, cols: int, proj_dim: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Columns [block·BLOCK_COLUMNS, +cols) of the projection of tensor `tensor_index`: [rows, cols]."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + tensor_index * 10_007 + block)
    return torch.randn(rows, cols, generator=g, dtype=dtype) / proj_dim ** 0.5


def projection_matrix(layout: ParamLayout, proj_dim: int, seed: int, columns: slice | None = None,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Per tensor, P_l[:, columns] [size_l, n_columns]; `columns` must start on a block boundary."""
    columns = columns or slice(0, proj_dim)
    if columns.start % BLOCK_COLUMNS:
        raise ValueError("projection columns must start on a multiple of BLOCK_COLUMNS")
    out = {}
    for t, (name, size) in enumerate(zip(layout.names, layout.sizes)):
        blocks = []
        for start in range(columns.start, columns.stop, BLOCK_COLUMNS):
            cols = min(BLOCK_COLUMNS, columns.stop - start)
            blocks.append(projection_block(seed, t, start // BLOCK_COLUMNS, size, cols, proj_dim, dtype))
        out[name] = torch.cat(blocks, dim=1)
    return out


@contextmanager
def single_thread():
    """Many tiny ops: intra-op threading only adds synchronisation (ruinous when the machine is
    oversubscribed — measured 17× slower with 2 threads under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def project(g: DenseGrads | FactoredGrads, P: dict[str, torch.Tensor], scratch_mb: float = 64.0,
            cache: dict | None = None) -> torch.Tensor:
    """Σ_l g_l P_l: [n, n_columns]. Factored weights with mostly-zero inputs (one-hot data) are
    projected through their non-zeros only, column by column of the input:
    φ_i += a_id · b_iᵀ P[:, d, :] for the rows i with a_id ≠ 0 — one [rows, d_out] × [d_out, k]
    GEMM per input column, nnz·d_out·k multiply-adds instead of n·d_in·d_out·k. Dense inputs
    materialise b_i a_iᵀ in row blocks of at most `scratch_mb`. `cache` keeps the
    [d_in, d_out, k] re-layout of P between calls."""
    if isinstance(g, DenseGrads):
        return sum(g.block(name) @ P[name].to(g.G.dtype) for name in g.tensor_names)
    cache = {} if cache is None else cache
    n, k = len(g), next(iter(P.values())).shape[1]
    out = torch.zeros(n, k, dtype=g.layers[0].B.dtype, device=g.layers[0].B.device)
    for lf in g.layers:
        if lf.bias:
            out += lf.B @ P[lf.bias].to(lf.B.dtype)
        if not lf.weight:
            continue
        Pw = P[lf.weight].to(lf.B.dtype)
        d_out, d_in = lf.B.shape[1], lf.A.shape[1]
        A = lf.A.to_dense() if lf.A.layout != torch.strided else lf.A
        nz = A.nonzero()
        if A.numel() > 0 and len(nz) <= SPARSE_DENSITY * A.numel():
            if lf.weight not in cache:
                cache[lf.weight] = Pw.view(d_out, d_in, k).permute(1, 0, 2).contiguous()  # [d_in, d_out, k]
            Pd = cache[lf.weight]
            order = nz[:, 1].argsort()
            rows, cols = nz[order, 0], nz[order, 1]
            vals = A[rows, cols]
            counts = torch.bincount(cols, minlength=d_in).tolist()
            start = 0
            with single_thread():
                for d, c in enumerate(counts):
                    if c:
                        r = rows[start:start + c]
                        # a row holds column d at most once, so r has no repeats and += is exact
                        # (and, on CPU, far faster than index_add_)
                        out[r] += (lf.B[r] * vals[start:start + c, None]) @ Pd[d]
                        start += c
            continue
        step = max(1, int(scratch_mb * 2**20 // (4 * d_out * d_in)))
        for i in range(0, n, step):
            G = (lf.B[i:i + step].unsqueeze(2) * A[i:i + step].unsqueeze(1)).flatten(1)
            out[i:i + step] += G @ Pw
    return out


def output_weights(model, x, y, task) -> torch.Tensor:
    """w = dloss/df at each example [n] (f = margin or output)."""
    with torch.no_grad():
        model.eval()
        out = model(x.to(next(model.parameters()).device))
        y = y.to(out.device)
        if task == "classification":
            return -(1 - torch.softmax(out, dim=1).gather(1, y.view(-1, 1)).squeeze(1))
        return 2 * (out.reshape(y.shape) - y)


class TRAK(Method):
    """`proj_dim`: k (null: no projection, the exact Gauss–Newton kernel in parameter space —
    only for small models). `damping`: λ added to ΦᵀΦ. Scores [n_test, n_left_out]."""

    def __init__(self, proj_dim: int | None = 2048, seed: int = 0, damping: float = 0.0,
                 factored: str | bool = "auto", chunk_size: int = 256, max_train_rows_per_chunk: int | None = None):
        super().__init__()
        if proj_dim is not None and proj_dim <= 0:
            raise ConfigError(f"method.proj_dim={proj_dim} must be positive or null (no projection)")
        if damping < 0:
            raise ConfigError(f"method.damping={damping} must be >= 0")
        self.proj_dim, self.seed, self.damping = proj_dim, int(seed), float(damping)
        self.factored = check_factored(factored)
        self.chunk_size = positive_int("chunk_size", chunk_size, "rows per per-example-gradient chunk", 256)
        self.max_rows = optional_positive_int("max_train_rows_per_chunk", max_train_rows_per_chunk,
                                              "training rows per chunk", 1024)

    def features(self, problem: AttributionProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Φ_train [n_train, k], φ_test [n_test, k], φ_left_out [n_left_out, k])."""
        phi, phi_test, phi_lo = self._features(problem, [(problem.x_test, problem.y_test),
                                                         (problem.x_left_out, problem.y_left_out)])
        return phi, phi_test, phi_lo

    def _features(self, problem: AttributionProblem, others: list[tuple[torch.Tensor, torch.Tensor]]
                  ) -> list[torch.Tensor]:
        """[Φ_train [n_train, k], then φ [n, k] of each (x, y) of `others`]: one pass over the
        training set per column block of the projection."""
        model, target = problem.model, margin_target(problem.task)
        layout = ParamLayout.of(model)
        k = self.proj_dim or layout.n_params
        budget = problem.memory_budget_mb
        phi_bytes = 4 * k * (problem.n_train + sum(len(x) for x, _ in others))
        if phi_bytes > budget * 2**20 / 2:
            raise MemoryError(f"TRAK features need {phi_bytes / 2**20:.0f} MB, more than half of "
                              f"attribution.memory_budget_mb={budget}; lower method.proj_dim or raise the budget")
        # column blocks of P sized to a quarter of the budget; gradients are recomputed per block
        p_bytes_per_col = 4 * layout.n_params
        cols = max(BLOCK_COLUMNS, int(budget * 2**20 / 4 // p_bytes_per_col) // BLOCK_COLUMNS * BLOCK_COLUMNS)
        col_blocks = [slice(s, min(s + cols, k)) for s in range(0, k, cols)]
        self.record.update({"proj_dim": k, "column_blocks": len(col_blocks)})
        grads = [compute_grads(model, x, y, target, self.factored, self.chunk_size) for x, y in others]
        # P is drawn in float32 whatever the model's dtype, so a float64 model sees the same P
        dtype, dev = next(model.parameters()).dtype, next(model.parameters()).device
        phi = torch.zeros(problem.n_train, k, dtype=dtype, device=dev)
        phis = [torch.zeros(len(g), k, dtype=dtype, device=dev) for g in grads]
        progress = Progress()
        for b, cb in enumerate(col_blocks):
            if self.proj_dim is None:
                P = {name: torch.eye(layout.n_params, dtype=dtype, device=dev)[sl, cb]
                     for name, sl in layout.slices().items()}
            else:
                P = {name: v.to(dev, dtype) for name, v in projection_matrix(layout, k, self.seed, cb).items()}
            cache: dict = {}
            for g, out in zip(grads, phis):
                out[:, cb] = project(g, P, cache=cache)
            row_budget = max(budget / 4 - cols * p_bytes_per_col / 2**20, budget / 16)
            for rows, g in iter_grad_chunks(model, problem.x_train, problem.y_train, target, row_budget,
                                            self.factored, self.max_rows):
                if progress.due():
                    log.info("trak: projection column block %d of %d, training row %d of %d", b + 1, len(col_blocks),
                             rows.start, problem.n_train)
                phi[rows, cb] = project(g, P, cache=cache)
        return [phi, *phis]

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        phi, phi_test, phi_lo = self.features(problem)
        X = kernel_solve(phi.double(), phi_lo.double().T, self.damping)
        s = phi_test.double() @ X
        w_lo = output_weights(problem.model, problem.x_left_out, problem.y_left_out, problem.task).double()
        if problem.task == "classification":
            return s * (-w_lo)[None, :]
        w_test = output_weights(problem.model, problem.x_test, problem.y_test, problem.task).double()
        return s * w_test[:, None] * w_lo[None, :]

    def self_influence(self, problem: AttributionProblem) -> torch.Tensor:
        """The diagonal of :meth:`scores` with every training instance as test and left-out
        instance, [n_train]: φ_iᵀ(ΦᵀΦ + λI)⁻¹φ_i · Q_i (classification, the test-side factor
        dropped as in `scores` and in dattri's `self_attribute`) or w_i² φ_iᵀ(ΦᵀΦ + λI)⁻¹φ_i
        (regression), the training features computed once and solved for in column blocks
        within the memory budget."""
        (phi,) = self._features(problem, [])
        phi = phi.double()
        n, k = phi.shape
        quad = torch.empty(n, dtype=torch.float64, device=phi.device)
        rows = max(1, int(problem.memory_budget_mb * 2**20 / 4 // (3 * 8 * max(k, n))))  # rhs, solution, scratch
        for r in range(0, n, rows):
            block = phi[r:r + rows]
            quad[r:r + rows] = (block * kernel_solve(phi, block.T, self.damping).T).sum(1)
        w = torch.cat([output_weights(problem.model, problem.x_train[r:r + 1024], problem.y_train[r:r + 1024],
                                      problem.task) for r in range(0, n, 1024)]).double().to(quad.device)
        return (quad * (-w if problem.task == "classification" else w * w)).cpu()


def kernel_solve(phi: torch.Tensor, rhs: torch.Tensor, damping: float, rcond: float = 1e-10) -> torch.Tensor:
    """(ΦᵀΦ + λI)⁻¹ rhs for Φ [n, k], rhs [k, m]; with λ = 0 the pseudo-inverse (ΦᵀΦ)⁺.
    Works in the smaller of the two spaces: k×k (Cholesky) when n ≥ k, else the n×n Gram
    matrix M = ΦΦᵀ through (ΦᵀΦ + λI)⁻¹ = (I − Φᵀ(M + λI)⁻¹Φ)/λ, or for λ = 0
    (ΦᵀΦ)⁺ = Φᵀ U Λ⁻² Uᵀ Φ with M = UΛUᵀ."""
    n, k = phi.shape
    if n >= k:
        K = phi.T @ phi + damping * torch.eye(k, dtype=phi.dtype, device=phi.device)
        L, info = torch.linalg.cholesky_ex(K)
        if damping > 0 or int(info) == 0:
            return torch.cholesky_solve(rhs, L)
        return _pinv_apply(K, rhs, rcond)
    M = phi @ phi.T
    if damping > 0:
        L = torch.linalg.cholesky(M + damping * torch.eye(n, dtype=phi.dtype, device=phi.device))
        return (rhs - phi.T @ torch.cholesky_solve(phi @ rhs, L)) / damping
    lam, U = torch.linalg.eigh(M)
    keep = lam > rcond * lam.abs().max()
    U, lam = U[:, keep], lam[keep]
    return phi.T @ (U @ ((U.T @ (phi @ rhs)) / lam.pow(2)[:, None]))


def _pinv_apply(K: torch.Tensor, rhs: torch.Tensor, rcond: float) -> torch.Tensor:
    lam, U = torch.linalg.eigh(K)
    keep = lam > rcond * lam.abs().max()
    U, lam = U[:, keep], lam[keep]
    return U @ ((U.T @ rhs) / lam[:, None])
