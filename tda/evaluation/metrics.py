"""Per-test-instance similarity between attribution vectors.

Inputs are [n_test, n_left_out] score matrices (one row per test instance); outputs are
[n_test] vectors. Undefined values (a zero vector for cosine, a constant vector for
Spearman) are NaN and skipped by :func:`mean_and_se`, which counts them.
"""

from __future__ import annotations

import math

import torch


def rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row pair, of any finite magnitude: each row is first scaled by a power of
    two that brings its largest entry into [0.5, 1), so that no norm overflows (scores ×1e200)
    or underflows (×1e-170); scaling by a power of two is exact, so for every other input the
    result is bit for bit the unscaled formula's."""
    a, b = _unit_exponent(a.double()), _unit_exponent(b.double())
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


def _unit_exponent(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] with each row multiplied by 2^-e, e the binary exponent of its largest |entry|
    (a zero row is left as it is)."""
    _, exponent = torch.frexp(x.abs().amax(-1, keepdim=True))
    return torch.ldexp(x, -exponent.to(x.dtype))


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks along the last dim (ties share their mean rank, as scipy.stats.rankdata)."""
    x = x.double()
    sorted_x, order = x.sort(dim=-1)
    n = x.shape[-1]
    pos = torch.arange(n, dtype=torch.float64).expand_as(x)
    # for each element in sorted order, average the positions of its tie group
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    group_id = new_group.long().cumsum(-1) - 1
    sums = torch.zeros_like(sorted_x).scatter_add_(-1, group_id, pos)
    counts = torch.zeros_like(sorted_x).scatter_add_(-1, group_id, torch.ones_like(pos))
    avg = (sums / counts.clamp_min(1)).gather(-1, group_id)
    ranks = torch.empty_like(avg)
    ranks.scatter_(-1, order, avg)
    return ranks + 1


def rowwise_spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return rowwise_cosine(ra, rb)


def mean_and_se(values: torch.Tensor) -> tuple[float, float, int, int]:
    """(nan-aware mean, standard error std/√n, n used, n skipped as undefined)."""
    v = values.double()
    ok = ~torch.isnan(v)
    n = int(ok.sum())
    skipped = int((~ok).sum())
    if n == 0:
        return math.nan, math.nan, 0, skipped
    vals = v[ok]
    mean = float(vals.mean())
    se = float(vals.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return mean, se, n, skipped


METRICS = {"cosine": rowwise_cosine, "spearman": rowwise_spearman}
