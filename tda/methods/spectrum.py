"""Cheap certificates about the spectrum of a symmetric operator, from its products alone.

The iterative solvers need K = C + λI (C the Hessian or Gauss–Newton of the mean training
loss) to be positive definite: LiSSA's recursion h ← g + (I − K/s) h grows without bound along
any eigenvector with eigenvalue ≤ 0, at the rate 1 + |μ|/s per step, which can be slow enough
to pass any norm bound. Two estimates catch this:

- :func:`lanczos_extremes`: a few Lanczos steps (full reorthogonalisation, float64) from a
  seeded random start. Its Ritz values lie inside K's spectrum (Cauchy interlacing), so the
  smallest one is an *upper* bound on λ_min(K): a Ritz value ≤ 0 proves that K is not
  positive definite, while a positive one proves nothing by itself (few steps can miss a
  small negative eigenvalue).
- :func:`span_ritz_min` (:func:`span_ritz`): the smallest Ritz value of K on the span of given vectors, e.g. the
  final iterates and increments of the recursion. The increments h_t − h_{t−1} =
  (I − K/s)^t g (over the whole set; mini-batches add noise) are power iterations, so after a
  diverging run they point along the eigenvectors that grow and their Rayleigh quotient is
  ≤ 0 — again a proof, never a false alarm for a positive definite K.

"≤ 0" is taken with the tolerance :func:`definiteness_tolerance`: eigenvalues closer to 0 than
the operator's own rounding (`NUMERICAL_ZERO` × the machine epsilon of its dtype × the largest
Ritz value) cannot be told apart from 0, and K is then too weakly damped to invert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# |μ| ≤ NUMERICAL_ZERO · eps(dtype) · μ_max is indistinguishable from 0 in the operator's precision
NUMERICAL_ZERO = 100.0


def definiteness_tolerance(mu_max: float, dtype: torch.dtype) -> float:
    """The smallest eigenvalue that counts as positive for an operator computed in `dtype`
    whose largest eigenvalue is ≈ `mu_max`."""
    return NUMERICAL_ZERO * torch.finfo(dtype).eps * abs(float(mu_max))


def lanczos_extremes(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, steps: int,
                     generator: torch.Generator, dtype: torch.dtype, device: torch.device | None = None) -> dict:
    """Smallest and largest Ritz values of the symmetric operator `matvec` ([n, 1] -> [n, 1] in
    `dtype`) after at most `steps` Lanczos steps (fewer if the Krylov space becomes invariant:
    then the Ritz values are exact eigenvalues). The basis is kept and reorthogonalised in
    float64 ([steps + 1, n] memory).
    Returns {"min", "max" (floats), "steps" (products used), "exact" (invariant subspace found)}."""
    steps = max(1, min(int(steps), n))
    Q = torch.zeros(steps + 1, n, dtype=torch.float64, device=device)  # the basis as contiguous rows
    T = torch.zeros(steps + 1, steps + 1, dtype=torch.float64)
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
    Q[0] = v / v.norm()
    m, exact, ritz = 0, False, torch.zeros(1, dtype=torch.float64)
    for j in range(steps):
        w = matvec(Q[j].to(dtype).unsqueeze(1)).reshape(-1).double()
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            c = Q[:j + 1] @ w
            w = w - c @ Q[:j + 1]
            T[:j + 1, j] += c.cpu()
        m = j + 1
        # T is upper Hessenberg (column j: the coefficients of K q_j, row j + 1: β); K symmetric
        # makes it tridiagonal up to rounding, so its symmetric part holds the Ritz values
        ritz = torch.linalg.eigvalsh((T[:m, :m] + T[:m, :m].T) / 2)
        beta = float(w.norm())
        if beta <= 1e-12 * float(ritz.abs().max().clamp_min(1e-300)):
            exact = True
            break
        Q[j + 1] = w / beta
        T[j + 1, j] = beta
    return {"min": float(ritz[0]), "max": float(ritz[-1]), "steps": m, "exact": exact}


def span_ritz_min(W: torch.Tensor, matvec: Callable[[torch.Tensor], torch.Tensor], rtol: float = 1e-6,
                  rows: int = 1 << 18, columns: int = 32) -> float:
    """The smallest Ritz value of K on span(W), W [n, m]: the minimum of the Rayleigh quotient
    vᵀKv / vᵀv over the span, an upper bound on λ_min(K) (+inf if W is 0). See :func:`span_ritz`."""
    return span_ritz(W, matvec, 0, rtol, rows, columns)[0]


def span_ritz(W: torch.Tensor, matvec: Callable[[torch.Tensor], torch.Tensor], first: int = 0, rtol: float = 1e-6,
              rows: int = 1 << 18, columns: int = 32) -> tuple[float, torch.Tensor | None]:
    """(the smallest Ritz value of K on span(W), K W[:, :first]): W [n, m]; the products
    [n, first] in float64 (None for first = 0) come from those with the basis of the span
    (W[:, :first] = V C, so K W = (K V) C), at no extra product — LiSSA's residual reuses its
    definiteness check's products this way.

    Precision: the span is first given an orthonormal basis V (from W's Gram matrix, all in
    float64, dropping directions whose singular value is below `rtol` × the largest), stored
    in W's dtype, and K is applied to V — not to W: iterates and increments are nearly
    parallel, and the Ritz values of (WᵀKW, WᵀW) would amplify the operator's rounding (eps of
    a float32 product × ‖K‖) by the Gram matrix's condition number, enough to fake a negative
    value for a positive definite K. On V the error stays at ~eps·‖K‖. C is the least-squares
    solution (float64) on the stored V, so K W inherits the products' own error; a column
    the basis represents less well than `NUMERICAL_ZERO` × eps (a direction dropped as
    dependent) is multiplied afresh. Products with K take `columns` columns at a time and the
    float64 sums `rows` rows at a time, so the extra memory is V, the products wanted, and
    [rows, m] float64."""
    n, m = W.shape
    f64 = torch.float64
    first = int(first)

    def blocks():
        return range(0, n, rows)

    gram = torch.zeros(m, m, dtype=f64, device=W.device)
    for r in blocks():
        Wr = W[r:r + rows].to(f64)
        gram += Wr.T @ Wr
    norms = gram.diagonal().clamp_min(0).sqrt()
    live = (norms > 0).nonzero().squeeze(1)
    if len(live) == 0:
        return float("inf"), (torch.zeros(n, first, dtype=f64, device=W.device) if first else None)
    inv = 1 / norms[live]
    e, U = torch.linalg.eigh(gram[live][:, live] * inv[:, None] * inv[None, :])
    good = e > rtol ** 2 * e[-1]
    B = inv[:, None] * (U[:, good] / e[good].sqrt())  # W[:, live] B is orthonormal
    V = torch.empty(n, B.shape[1], dtype=W.dtype, device=W.device)
    for r in blocks():
        V[r:r + rows] = (W[r:r + rows, live].to(f64) @ B).to(W.dtype)
    k = V.shape[1]
    G = torch.zeros(k, k, dtype=f64, device=W.device)  # Vᵀ V (= I up to V's rounding to W's dtype)
    VtW = torch.zeros(k, first, dtype=f64, device=W.device)
    for r in blocks():
        Vr = V[r:r + rows].to(f64)
        G += Vr.T @ Vr
        VtW += Vr.T @ W[r:r + rows, :first].to(f64)
    L = torch.linalg.cholesky((G + G.T) / 2)
    C = torch.cholesky_solve(VtW, L)  # W[:, :first] ≈ V C
    A = torch.zeros(k, k, dtype=f64, device=W.device)  # Vᵀ K V
    KW = torch.zeros(n, first, dtype=f64, device=W.device) if first else None
    for c in range(0, k, columns):
        KVc = matvec(V[:, c:c + columns])
        for r in blocks():
            KVr = KVc[r:r + rows].to(f64)
            A[:, c:c + columns] += V[r:r + rows].to(f64).T @ KVr
            if first:
                KW[r:r + rows] += KVr @ C[c:c + columns]
    if first:
        missed, size = torch.zeros(first, dtype=f64, device=W.device), torch.zeros(first, dtype=f64, device=W.device)
        for r in blocks():
            Wr = W[r:r + rows, :first].to(f64)
            missed += (Wr - V[r:r + rows].to(f64) @ C).pow(2).sum(0)
            size += Wr.pow(2).sum(0)
        redo = (missed.sqrt() > NUMERICAL_ZERO * torch.finfo(W.dtype).eps * size.sqrt()).nonzero().squeeze(1)
        if len(redo):
            KW[:, redo] = matvec(W[:, redo]).to(f64)
    Li = torch.linalg.solve_triangular(L, torch.eye(k, dtype=f64, device=W.device), upper=False)
    M = Li @ ((A + A.T) / 2) @ Li.T
    return float(torch.linalg.eigvalsh((M + M.T) / 2)[0]), KW
