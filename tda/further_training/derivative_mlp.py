"""Forward mode of the derivative gold standard for a Linear/ReLU stack, tangents batched by hand.

The generic tangent step (tda.further_training.weighted_run) differentiates one step with
``vmap(jvp(grad(step)))``; for the paper's MLP on one-hot inputs (Folktables: 791 inputs, 10
non-zeros per row) that spends its time on the dense first layer and on vmap's copies. Here the
same step is written out over the stack's op list (tda.models.structure.LinearReLUStack): the
forward pass, the backward pass (δ_L = c ⊙ ∂ℓ/∂z_L, g_W = δᵀh, δ_in = δW ⊙ 1[z > 0]), clipping and
the optimizer, each with its tangent (forward-over-reverse by hand: ż = ḣWᵀ + hẆᵀ + ḃ, δ̇,
ġ_W = δ̇ᵀh + δᵀḣ, ...), for K tangents at once ([K, ...] tensors). Row-sparse inputs
(tda.models.structure.sparse_rows) gather / scatter only the first layer's weight columns a row
touches. The first layer's weight is held transposed ([d, out]) so that those gathers read
contiguous rows. Equality with the generic path is tested in
tests/test_further_training_derivative.py (float64, 1e-10).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tda.further_training.functional_optim import safe_sqrt
from tda.models.structure import LinearOp, LinearReLUStack, ReLUOp, sparse_rows


@dataclass(frozen=True)
class StackTrajectory:
    """What the Linear/ReLU fast paths (forward and reverse) read of a WeightedTrajectory: the
    full-data run of one seed of a model with no buffers. Tensors are on the run's device, in its
    dtype (labels excepted)."""

    stack: LinearReLUStack  # the op list; parameter tensors are listed in stack.names order
    params: tuple[torch.Tensor, ...]  # θᶠ, one per stack.names
    optimizer: str  # SGD | Adam | AdamW (the arithmetic of tda.further_training.functional_optim)
    hp: dict[str, Any]  # its hyper-parameters, every default filled in
    n_slots: int  # optimizer slots per parameter (momentum buffer; Adam's m and v)
    clip: float | None  # gradient-norm clipping
    task: str  # classification | regression
    normalisation: str  # mask | downweight (tda.further_training.derivative)
    x: torch.Tensor  # training inputs [n, d]
    y: torch.Tensor  # [n]
    x_test: torch.Tensor  # [n_test, d]
    y_test: torch.Tensor  # [n_test]
    sparse: bool  # gather / scatter the first layer's weight rows of row-sparse inputs
    batch: Callable[[int], torch.Tensor]  # the training rows [B] of step `clock` (0-based)

    @property
    def P(self) -> int:
        """Parameters in a state (the optimizer slots follow them)."""
        return len(self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def initial_state(self) -> list[torch.Tensor]:
        """(parameters..., optimizer slots...) at θᶠ, fresh optimizer (the model's layout)."""
        p = [t.clone() for t in self.params]
        return p + [torch.zeros_like(t) for _ in range(self.n_slots) for t in p]


class MLPTangents:
    """The primal step and K tangents of the full-data run of a Linear/ReLU stack: the steps
    forward mode carries along the run (tda.further_training.derivative.TangentSteps), in an
    internal layout."""

    def __init__(self, run: StackTrajectory):
        self.t = run
        self.ops = run.stack.ops
        self.first = run.stack.first.weight  # the first layer's weight: held transposed
        # plain SGD on row-sparse inputs: the first layer's tangent is updated by a scatter of the
        # touched rows only (its gradient tangent is never formed densely)
        self._plain_sgd = run.optimizer == "SGD" and run.clip is None and float(run.hp["momentum"]) == 0 \
            and float(run.hp["weight_decay"]) == 0
        if run.sparse:
            self.x, self.x_test = sparse_rows(run.x), sparse_rows(run.x_test)
        else:
            self.x, self.x_test = run.x, run.x_test

    # ------------------------------------------------------------------ layout
    def to_internal(self, state):
        """Model state -> internal (first weight and its optimizer slots transposed)."""
        P = self.t.P
        return [s.t().contiguous() if i % P == self.first else s for i, s in enumerate(state)]

    def initial_state(self):
        """The state at θᶠ, fresh optimizer, in the internal layout."""
        return self.to_internal(self.t.initial_state())

    # ------------------------------------------------------------------ first layer
    @staticmethod
    def _flat_cols(cols: torch.Tensor, K: int | None, d: int) -> torch.Tensor:
        """Row indices into a [K·d, out] view of K stacked [d, out] matrices: [K, B, k]."""
        return cols if K is None else cols.unsqueeze(0) + (torch.arange(K, device=cols.device) * d).view(K, 1, 1)

    def _lin1(self, x, w1t):
        """x [B, d] (or (cols, vals)) times w1t [(K,) d, out] -> [(K,) B, out]."""
        if isinstance(x, tuple):
            cols, vals = x
            K = w1t.shape[0] if w1t.dim() == 3 else None
            d, out = w1t.shape[-2:]
            idx = self._flat_cols(cols, K, d).reshape(-1, cols.shape[1])
            psw = vals if K is None else vals.expand(K, *vals.shape).reshape(-1, vals.shape[1])
            res = F.embedding_bag(idx, w1t.reshape(-1, out), per_sample_weights=psw, mode="sum")
            return res if K is None else res.view(K, -1, out)
        return torch.matmul(x, w1t)

    def _scatter1(self, x, delta, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """target [(K,) d, out] += alpha · xᵀ δ for row-sparse x, δ [(K,) B, out]."""
        cols, vals = x
        K = delta.shape[0] if delta.dim() == 3 else None
        d, out = target.shape[-2:]
        contrib = (delta.unsqueeze(-2) * vals.unsqueeze(-1)).reshape(-1, out)  # [(K·) B·k, out]
        target.view(-1, out).index_add_(0, self._flat_cols(cols, K, d).reshape(-1), contrib, alpha=alpha)
        return target

    def _grad1(self, x, delta, shape):
        """xᵀ δ as [(K,) d, out] for δ [(K,) B, out]."""
        if isinstance(x, tuple):
            out = torch.zeros((*delta.shape[:-2], *shape), dtype=delta.dtype, device=delta.device)
            return self._scatter1(x, delta, out)
        return torch.matmul(x.t(), delta)

    # ------------------------------------------------------------------ forward pass with tangents
    def _forward(self, params, tparams, x):
        """Inputs of every op, their tangents, and the output (and its tangent)."""
        hs, hd = [], []
        h, hdot = x, None
        for op in self.ops:
            hs.append(h)
            hd.append(hdot)
            if isinstance(op, LinearOp):
                wi, bi = op.weight, op.bias
                if wi == self.first:
                    z, zdot = self._lin1(h, params[wi]), self._lin1(h, tparams[wi])
                else:
                    W, Wd = params[wi], tparams[wi]
                    z = h @ W.t()
                    zdot = torch.matmul(h, Wd.transpose(-1, -2))
                    if hdot is not None:
                        zdot = zdot + hdot @ W.t()
                if bi is not None:
                    z = z + params[bi]
                    zdot = zdot + tparams[bi].unsqueeze(-2)
                h, hdot = z, zdot
            else:
                mask = h > 0
                h, hdot = torch.relu(h), hdot * mask
        return hs, hd, h, hdot

    def _loss_grad(self, out, outdot, y):
        """Per-example losses ℓ [B], ∂ℓ/∂out [B, ...] and its tangent [K, B, ...]."""
        if self.t.task == "classification":
            ell = F.cross_entropy(out, y, reduction="none")
            p = torch.softmax(out, dim=-1)
            d = p - F.one_hot(y, out.shape[-1]).to(p.dtype)
            ddot = p * (outdot - (p * outdot).sum(-1, keepdim=True))
            return ell, d, ddot
        r = out.reshape(y.shape) - y
        return r.pow(2), (2 * r).reshape(out.shape), 2 * outdot

    @torch.no_grad()
    def tangent_step(self, state, tstate, clock: int, tw: torch.Tensor):
        """(state, tangents [K, ...]) after step `clock`; tw [K, B]: the tangents of the batch's weights."""
        t = self.t
        idx = t.batch(clock).to(t.device)
        x = tuple(a[idx] for a in self.x) if isinstance(self.x, tuple) else self.x[idx]
        y = t.y[idx]
        P = t.P
        params, tparams = state[:P], tstate[:P]
        hs, hd, out, outdot = self._forward(params, tparams, x)
        _, dl, dldot = self._loss_grad(out, outdot, y)
        B = len(idx)
        w = torch.ones(B, dtype=t.dtype, device=t.device)
        if t.normalisation == "mask":
            c = w / w.sum()
            cdot = (tw - c * tw.sum(1, keepdim=True)) / w.sum()
        else:
            c = w / B
            cdot = tw / B
        shape_c = (-1,) + (1,) * (dl.dim() - 1)
        delta = dl * c.reshape(shape_c)
        ddelta = dldot * c.reshape(shape_c) + dl * cdot.reshape(cdot.shape[0], *shape_c)
        g, gd = [None] * P, [None] * P
        for o in range(len(self.ops) - 1, -1, -1):
            op, h, hdot = self.ops[o], hs[o], hd[o]
            if isinstance(op, ReLUOp):
                mask = h > 0
                delta, ddelta = delta * mask, ddelta * mask
                continue
            wi, bi = op.weight, op.bias
            if bi is not None:
                g[bi], gd[bi] = delta.sum(0), ddelta.sum(-2)
            if wi == self.first:
                g[wi] = self._grad1(h, delta, params[wi].shape)
                scatter_later = self._plain_sgd and isinstance(h, tuple)  # see _optimizer
                gd[wi] = ddelta if scatter_later else self._grad1(h, ddelta, params[wi].shape)
                break
            W, Wd = params[wi], tparams[wi]
            g[wi] = delta.t() @ h
            gd[wi] = torch.matmul(ddelta.transpose(-1, -2), h)
            if hdot is not None:
                gd[wi] = gd[wi] + torch.matmul(delta.t(), hdot)
            delta, ddelta = delta @ W, ddelta @ W + torch.matmul(delta, Wd)
        K = tw.shape[0]
        if t.clip is not None:
            total = torch.sqrt(sum((a * a).sum() for a in g))
            tdot = sum((a * ad).reshape(K, -1).sum(1) for a, ad in zip(g, gd)) / total  # [K]
            raw = float(t.clip) / (total + 1e-6)
            coef = torch.clamp(raw, max=1.0)
            cdot = -raw / (total + 1e-6) * tdot * (raw < 1).to(tdot.dtype)
            gd = [ad * coef + a * cdot.reshape(K, *([1] * a.dim())) for a, ad in zip(g, gd)]
            g = [a * coef for a in g]
        return self._optimizer(state, tstate, g, gd, clock + 1, x)

    def _optimizer(self, state, tstate, g, gd, s, x):
        t, hp = self.t, self.t.hp
        P = t.P
        opt, topt = state[P:], tstate[P:]
        lr, wd = float(hp["lr"]), float(hp["weight_decay"])
        new_p, new_tp, new_o, new_to = [], [], [], []
        if t.optimizer == "SGD":
            mom, damp = float(hp["momentum"]), float(hp["dampening"])
            for i in range(P):
                p, pd, gi, gdi = state[i], tstate[i], g[i], gd[i]
                if wd != 0:
                    gi, gdi = gi + wd * p, gdi + wd * pd
                if mom != 0:
                    buf = gi if s == 1 else opt[i] * mom + (1 - damp) * gi
                    bufd = gdi if s == 1 else topt[i] * mom + (1 - damp) * gdi
                    new_o.append(buf)
                    new_to.append(bufd)
                    if hp["nesterov"]:
                        gi, gdi = gi + mom * buf, gdi + mom * bufd
                    else:
                        gi, gdi = buf, bufd
                new_p.append(p - lr * gi)
                if i == self.first and self._plain_sgd and isinstance(x, tuple):  # gdi is δ̇ of the first layer
                    new_tp.append(self._scatter1(x, gdi, pd, alpha=-lr))
                else:
                    new_tp.append(pd.sub_(gdi, alpha=lr))
            return new_p + new_o, new_tp + new_to
        b1, b2 = (float(b) for b in hp["betas"])
        eps = float(hp["eps"])
        bc1, bc2 = 1 - b1 ** s, 1 - b2 ** s
        ms, vs, tms, tvs = [], [], [], []
        for i in range(P):
            p, pd, gi, gdi = state[i], tstate[i], g[i], gd[i]
            if wd != 0:
                if t.optimizer == "AdamW":
                    p, pd = p * (1 - lr * wd), pd.mul_(1 - lr * wd)
                else:
                    gi, gdi = gi + wd * p, gdi + wd * pd
            m, md = torch.lerp(opt[i], gi, 1 - b1), topt[i].lerp_(gdi, 1 - b1)
            v = torch.addcmul(opt[P + i] * b2, gi, gi, value=1 - b2)
            vd = topt[P + i].mul_(b2).addcmul_(gdi, (2 * (1 - b2)) * gi)
            sq = safe_sqrt(v)
            denom = sq / bc2 ** 0.5 + eps
            # p' = p − (lr/bc1)·m/denom, denom = √v/√bc2 + eps: ṗ' = ṗ − (lr/bc1)·(ṁ/denom − m·v̇/(2√v·√bc2·denom²))
            inv = 1 / denom
            dv = torch.where(v > 0, m * inv * inv / torch.where(v > 0, 2 * sq, torch.ones_like(sq)),
                             torch.zeros_like(sq)) / bc2 ** 0.5
            new_p.append(torch.addcdiv(p, m, denom, value=-(lr / bc1)))
            new_tp.append(pd.addcmul_(md, inv, value=-(lr / bc1)).addcmul_(vd, dv, value=lr / bc1))
            ms.append(m)
            vs.append(v)
            tms.append(md)
            tvs.append(vd)
        return new_p + ms + vs, new_tp + tms + tvs

    @torch.no_grad()
    def test_tangents(self, state, tstate):
        """[n_test] losses and their tangents [K, n_test] (a Linear/ReLU stack: eval = train mode)."""
        P = self.t.P
        _, _, out, outdot = self._forward(state[:P], tstate[:P], self.x_test)
        ell, d, _ = self._loss_grad(out, outdot, self.t.y_test)
        dot = (d * outdot).reshape(*outdot.shape[:2], -1).sum(-1) if self.t.task == "classification" \
            else (d * outdot).reshape(outdot.shape[0], -1)
        return ell, dot
