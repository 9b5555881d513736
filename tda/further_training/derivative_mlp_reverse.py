"""Reverse mode of the derivative gold standard for a Linear/ReLU stack, cotangents batched by hand.

The generic adjoint step (tda.further_training.weighted_run) differentiates one step with
``vmap(vjp(step))`` over M (checkpoint, test instance) cotangents: every cotangent pays a dense
first layer and vmap's copies of parameter-sized tensors. Here the vector-Jacobian product of one
optimizer step is written out over the op list the forward fast path runs
(tda.further_training.derivative_mlp: a StackTrajectory), for M cotangents at once:

- the optimizer's adjoint (SGD with momentum / dampening / Nesterov / weight decay, Adam, AdamW),
  elementwise on [M, ...] tensors: λ_p, λ_slots -> λ_p, λ_slots and λ_g, the cotangent of the
  (clipped) gradient;
- the clipping's adjoint (g = coef(‖g_raw‖)·g_raw): u = coef·λ_g + g_raw · κ⟨g_raw, λ_g⟩;
- the gradient's adjoint, u ↦ (H u, ∂⟨u, g_raw⟩/∂w): the Hessian of the weighted batch loss is
  symmetric, so its vector-Jacobian product is the Hessian-vector product, computed forward-over-
  reverse (the tangent forward pass in direction u: ż = ḣWᵀ + h uᵀ + u_b, then the tangent of the
  backward pass, as in derivative_mlp); the per-example inner products e_i = ⟨u, ∇ℓ_i⟩ = ∂ℓ_i/∂out ·
  ȯut_i come from the same tangent forward pass, and ∂⟨u, g_raw⟩/∂w_j = (e_j − mean e)/|B| (`mask`)
  or e_j/|B| (`downweight`) at w = 1.

Per step that is a few batched matmuls over the batch ([M, B, width]); on one-hot inputs the first
layer's cotangent is read by gathering the active rows (embedding_bag) and H u is scattered back
into those rows only. Reverse mode (tda.further_training.derivative) stores the state every k steps
and recomputes each segment with the primal step here (the generic path's arithmetic). Equality
with the generic path (float64, 1e-10) and with forward mode is tested in
tests/test_further_training_derivative.py.
"""

from __future__ import annotations

import torch

from tda.further_training.derivative_mlp import MLPTangents, StackTrajectory
from tda.further_training.functional_optim import optimizer_step, safe_sqrt
from tda.models.structure import LinearOp, ReLUOp


class MLPAdjoint:
    """Primal steps and the adjoint of one step of the full-data run of a Linear/ReLU stack: the
    steps reverse mode carries back along the run (tda.further_training.derivative.AdjointSteps);
    states in MLPTangents' internal layout (first weight transposed)."""

    def __init__(self, run: StackTrajectory):
        self.t = run
        self.fp = MLPTangents(run)
        self.ops, self.first = self.fp.ops, self.fp.first
        self.P = run.P

    def initial_state(self):
        return self.fp.initial_state()

    # ------------------------------------------------------------------ primal
    def _lin(self, h, params, wi):
        return self.fp._lin1(h, params[wi]) if wi == self.first else h @ params[wi].t()

    def forward(self, params, x):
        """Inputs of every op and the output."""
        hs, h = [], x
        for op in self.ops:
            hs.append(h)
            if isinstance(op, LinearOp):
                h = self._lin(h, params, op.weight)
                if op.bias is not None:
                    h = h + params[op.bias]
            else:
                h = torch.relu(h)
        return hs, h

    def _dloss(self, out, y):
        """∂ℓ_i/∂out [B, ...] and, for classification, the softmax (for the tangent of it)."""
        if self.t.task == "classification":
            p = torch.softmax(out, dim=-1)
            return p - torch.nn.functional.one_hot(y, out.shape[-1]).to(p.dtype), p
        return (2 * (out.reshape(y.shape) - y)).reshape(out.shape), None

    def _backward(self, params, hs, delta, first_shape):
        """Parameter gradients for output deltas [B, out] (already weighted)."""
        g = [None] * self.P
        for o in range(len(self.ops) - 1, -1, -1):
            op, h = self.ops[o], hs[o]
            if isinstance(op, ReLUOp):
                delta = delta * (h > 0)
                continue
            wi, bi = op.weight, op.bias
            if bi is not None:
                g[bi] = delta.sum(0)
            if wi == self.first:
                g[wi] = self.fp._grad1(h, delta, first_shape)
                break
            g[wi] = delta.t() @ h
            delta = delta @ params[wi]
        return g

    def batch_inputs(self, clock):
        idx = self.t.batch(clock).to(self.t.device)
        x = tuple(a[idx] for a in self.fp.x) if isinstance(self.fp.x, tuple) else self.fp.x[idx]
        return idx, x, self.t.y[idx]

    def gradient(self, params, x, y):
        """hs, dl, softmax, c, raw gradient, clip (coef, raw ratio, norm) at w = 1."""
        hs, out = self.forward(params, x)
        dl, prob = self._dloss(out, y)
        B = dl.shape[0]
        c = 1.0 / B  # w = 1: both normalisations weigh every batch row 1/|B|
        g = self._backward(params, hs, dl * c, params[self.first].shape)
        clip = None
        if self.t.clip is not None:
            total = torch.sqrt(sum((a * a).sum() for a in g))
            raw = float(self.t.clip) / (total + 1e-6)
            clip = (torch.clamp(raw, max=1.0), raw, total)
        return hs, dl, prob, c, g, clip

    @torch.no_grad()
    def step(self, state, clock):
        """The primal step (the generic path's arithmetic)."""
        t, hp, P = self.t, self.t.hp, self.P
        _, x, y = self.batch_inputs(clock)
        params, opt = state[:P], state[P:]
        _, _, _, _, g, clip = self.gradient(params, x, y)
        if clip is not None:
            g = [a * clip[0] for a in g]
        new_p, new_o = optimizer_step(t.optimizer, hp, list(params), g, list(opt), clock + 1)
        return new_p + new_o

    @torch.no_grad()
    def test_losses(self, state):
        _, out = self.forward(state[:self.P], self.fp.x_test)
        if self.t.task == "classification":
            return torch.nn.functional.cross_entropy(out, self.t.y_test, reduction="none")
        return (out.reshape(self.t.y_test.shape) - self.t.y_test).pow(2)

    def test_gradients(self, state, zs: torch.Tensor):
        """Per-example gradients of the test losses of instances zs [R]: list of [R, ...] (internal layout)."""
        params = state[:self.P]
        x = self.t.x_test[zs]  # dense
        hs, out = self.forward(params, x)
        delta, _ = self._dloss(out, self.t.y_test[zs])
        g = [None] * self.P
        for o in range(len(self.ops) - 1, -1, -1):
            op, h = self.ops[o], hs[o]
            if isinstance(op, ReLUOp):
                delta = delta * (h > 0)
                continue
            wi, bi = op.weight, op.bias
            if bi is not None:
                g[bi] = delta
            if wi == self.first:
                g[wi] = h.unsqueeze(-1) * delta.unsqueeze(-2)  # [R, d, out]
                break
            g[wi] = delta.unsqueeze(-1) * h.unsqueeze(-2)  # [R, out, in]
            delta = delta @ params[wi]
        return g

    # ------------------------------------------------------------------ adjoint
    @torch.no_grad()
    def seed_adjoints(self, after, lam, rows: torch.Tensor, zs: list[int]):
        """λ (list of [M, ...]) with the gradients of the test losses of instances zs added at rows, in place."""
        for i, gz in enumerate(self.test_gradients(after, torch.tensor(zs, device=self.t.device))):
            lam[i].index_add_(0, rows, gz)
        return lam

    def _optimizer_adjoint(self, state, after, lam, g, s):
        """In place: λ_p, λ_slots of the state before the step; returns λ_g [M, ...] per parameter
        (the cotangent of the clipped gradient)."""
        t, hp, P = self.t, self.t.hp, self.P
        lr, wd = float(hp["lr"]), float(hp["weight_decay"])
        lg = []
        if t.optimizer == "SGD":
            mom, damp = float(hp["momentum"]), float(hp["dampening"])
            for i in range(P):
                lp = lam[i]
                lgi = lp * (-lr)
                if mom != 0:
                    lbt = lam[P + i].add_(lgi, alpha=mom) if hp["nesterov"] else lam[P + i].add_(lgi)
                    if hp["nesterov"]:
                        lgi = lgi.add_(lbt) if s == 1 else lgi.add_(lbt, alpha=1 - damp)
                    else:
                        lgi = lbt.clone() if s == 1 else lbt * (1 - damp)
                    lam[P + i] = lbt.zero_() if s == 1 else lbt.mul_(mom)
                if wd != 0:
                    lp.add_(lgi, alpha=wd)
                lg.append(lgi)
            return lg
        b1, b2 = (float(b) for b in hp["betas"])
        eps = float(hp["eps"])
        bc1, bc2 = 1 - b1 ** s, 1 - b2 ** s
        a = lr / bc1
        params = state[:P]
        for i in range(P):
            p, gi = params[i], g[i]
            if wd != 0 and t.optimizer == "Adam":
                gi = gi + wd * p
            m, v = after[P + i], after[2 * P + i]
            sq = safe_sqrt(v)
            inv = 1 / (sq / bc2 ** 0.5 + eps)
            pos = v > 0
            dv = torch.where(pos, (a / bc2 ** 0.5) * m * inv * inv / torch.where(pos, 2 * sq, torch.ones_like(sq)),
                             torch.zeros_like(sq))
            lp = lam[i]
            mu = lam[P + i].addcmul_(lp, inv, value=-a)  # λ_m' − a λ_p / D
            nu = lam[2 * P + i].addcmul_(lp, dv)  # λ_v' + λ_p ∂p'/∂v'
            lgi = torch.mul(mu, 1 - b1).addcmul_(nu, gi, value=2 * (1 - b2))
            mu.mul_(b1)
            nu.mul_(b2)
            if wd != 0:
                if t.optimizer == "AdamW":
                    lp.mul_(1 - lr * wd)
                else:
                    lp.add_(lgi, alpha=wd)
            lg.append(lgi)
        return lg

    @torch.no_grad()
    def adjoint_step(self, state, after, lam, clock):
        """λ (list of [M, ...], the cotangent of the state after step `clock`) -> that of the state
        before it, in place; returns (λ, ∂⟨λ, state_after⟩/∂w_batch [M, B], the batch indices [B])."""
        t, P = self.t, self.P
        idx, x, y = self.batch_inputs(clock)
        params = state[:P]
        hs, dl, prob, c, g_raw, clip = self.gradient(params, x, y)
        g = [a * clip[0] for a in g_raw] if clip is not None else g_raw
        lg = self._optimizer_adjoint(state, after, lam, g, clock + 1)
        M = lam[0].shape[0]
        if clip is not None:
            coef, raw, total = clip
            dot = sum((a * b).reshape(M, -1).sum(1) for a, b in zip(lg, g_raw))  # [M]
            kappa = (-raw / (total + 1e-6) / total * (raw < 1).to(dot.dtype)) * dot
            u = [b.mul_(coef).add_(a * kappa.reshape(M, *([1] * a.dim()))) for a, b in zip(g_raw, lg)]
        else:
            u = lg
        # tangent forward pass in direction u
        hd, hdot = [], None
        for o, op in enumerate(self.ops):
            hd.append(hdot)
            h = hs[o]
            if isinstance(op, LinearOp):
                wi, bi = op.weight, op.bias
                if wi == self.first:
                    zdot = self.fp._lin1(h, u[wi])
                else:
                    zdot = torch.matmul(h, u[wi].transpose(-1, -2))
                    if hdot is not None:
                        zdot = zdot + hdot @ params[wi].t()
                if bi is not None:
                    zdot = zdot + u[bi].unsqueeze(-2)
                hdot = zdot
            else:
                hdot = hdot * (h > 0)
        outdot = hdot  # [M, B, out]
        e = (dl * outdot).reshape(M, outdot.shape[1], -1).sum(-1)  # ⟨u, ∇ℓ_i⟩ [M, B]
        B = e.shape[1]
        gw = (e - e.mean(1, keepdim=True)) / B if t.normalisation == "mask" else e / B
        # tangent of the backward pass (cdot = 0): H u, added to λ_p
        if prob is not None:
            ddelta = prob * (outdot - (prob * outdot).sum(-1, keepdim=True))
        else:
            ddelta = 2 * outdot
        ddelta = ddelta * c
        delta = dl * c
        for o in range(len(self.ops) - 1, -1, -1):
            op, h, hdot = self.ops[o], hs[o], hd[o]
            if isinstance(op, ReLUOp):
                mask = h > 0
                delta, ddelta = delta * mask, ddelta * mask
                continue
            wi, bi = op.weight, op.bias
            if bi is not None:
                lam[bi].add_(ddelta.sum(-2))
            if wi == self.first:
                if isinstance(h, tuple):
                    self.fp._scatter1(h, ddelta, lam[wi])
                else:
                    lam[wi].add_(torch.matmul(h.t(), ddelta))
                break
            W = params[wi]
            hw = torch.matmul(ddelta.transpose(-1, -2), h)
            if hdot is not None:
                hw = hw + torch.matmul(delta.t(), hdot)
            lam[wi].add_(hw)
            delta, ddelta = delta @ W, ddelta @ W + torch.matmul(delta, u[wi])
        return lam, gw, idx
