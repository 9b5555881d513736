"""SGD, Adam and AdamW over stacked parameters: one independent optimizer per run.

Every tensor has a leading run dimension [R, ...]. The arithmetic is that of
`torch.optim.{SGD,Adam,AdamW}` (single-tensor implementation, the CPU default) applied to
each run separately, so R stacked runs equal R separate `torch.optim` optimizers; the
equality is checked in tests/test_further_training_engine.py. Each optimizer starts fresh (no
state), as final-model-only further training requires.

`active` [R] bool lets some runs sit out a step (a `drop` run whose epoch is one batch
shorter than the full run's): their parameters, moments and step counts stay untouched.
Per-run gradient-norm clipping is `torch.nn.utils.clip_grad_norm_` applied to each run's
own gradients, never to the whole stack.
"""

from __future__ import annotations

from typing import Any

import torch

SUPPORTED = ("SGD", "Adam", "AdamW")


def optimizer_spec(node: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kind, hyper-parameters) from a `further_optimizer` config node (`_target_` torch.optim.X)."""
    target = str(node.get("_target_", ""))
    kind = target.rsplit(".", 1)[-1]
    if kind not in SUPPORTED:
        raise ValueError(f"further_optimizer._target_={target!r}: the stacked further-training engine implements "
                         f"torch.optim.{{{', '.join(SUPPORTED)}}}; use one of "
                         f"conf/further_optimizer/{{sgd,adam,adamw}}.yaml "
                         f"or further_training.engine=reference for other optimizers")
    hp = {k: v for k, v in node.items() if k not in ("_target_", "_partial_", "name")}
    for flag in ("maximize", "amsgrad", "capturable", "differentiable"):
        if hp.pop(flag, False):
            raise ValueError(f"further_optimizer.{flag}=true is not supported by the stacked engine; "
                             f"set it to false or use further_training.engine=reference")
    for flag in ("foreach", "fused"):
        hp.pop(flag, None)  # implementation choices of torch.optim; the arithmetic is the same
    if kind == "SGD":
        known = {"lr", "momentum", "dampening", "weight_decay", "nesterov"}
    else:
        known = {"lr", "betas", "eps", "weight_decay"}
    unknown = set(hp) - known
    if unknown:
        raise ValueError(f"further_optimizer has options {sorted(unknown)} that the stacked {kind} does not implement; "
                         f"remove them or use further_training.engine=reference")
    return kind, hp


DEFAULTS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    "Adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "AdamW": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
}
"""torch.optim's defaults of the hyper-parameters the engines implement."""


def with_defaults(kind: str, hp: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters `hp` of optimizer `kind` with torch.optim's defaults filled in,
    checked as torch.optim checks them."""
    full = DEFAULTS[kind] | dict(hp)
    if kind == "SGD" and full["nesterov"] and (full["momentum"] <= 0 or full["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening (as in torch.optim.SGD)")
    return full


class StackedOptimizer:
    """One fresh torch.optim-equivalent optimizer per run, over params [R, ...]."""

    def __init__(self, kind: str, hp: dict[str, Any], params: list[torch.Tensor]):
        self.kind, self.params = kind, params
        R = params[0].shape[0]
        self.hp = with_defaults(kind, hp)
        self.steps = torch.zeros(R, dtype=torch.long)  # per run: a run may sit out a step
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]

    @staticmethod
    def _per_run(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], active: torch.Tensor | None = None) -> None:
        """Update in place. grads: same shapes as params; active [R] bool or None (all runs)."""
        if active is not None and bool(active.all()):
            active = None
        if active is None:
            started = self.steps > 0
            self.steps += 1
            for i, (p, g) in enumerate(zip(self.params, grads)):
                self._update(p, g, self.state[i], self.steps, started)
            return
        # rare (a `drop` epoch one batch shorter): update everything, then restore the runs
        # that sit out, parameters and state alike
        started = self.steps > 0
        old_p = [p.clone() for p in self.params]
        old_state = [{k: v.clone() for k, v in st.items()} for st in self.state]
        self.steps += active.long().cpu()
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self._update(p, g, self.state[i], self.steps.clamp_min(1), started)
            keep = self._per_run(active, p).bool()
            p.copy_(torch.where(keep, p, old_p[i]))
            for k, v in self.state[i].items():
                if k in old_state[i]:
                    v.copy_(torch.where(keep, v, old_state[i][k]))
                else:  # state created by this step: runs that sat out have none yet
                    v.copy_(torch.where(keep, v, torch.zeros_like(v)))

    def _update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], steps: torch.Tensor,
                started: torch.Tensor) -> None:
        hp = self.hp
        lr, wd = float(hp["lr"]), float(hp["weight_decay"])
        # gradients belong to this step only, so they are updated in place (no large
        # temporaries: those cost page faults on every step for multi-megabyte stacks)
        if self.kind == "SGD":
            if wd != 0:
                g = g.add_(p, alpha=wd)
            mom = float(hp["momentum"])
            if mom != 0:
                damp = float(hp["dampening"])
                if "momentum_buffer" not in state or not bool(started.any()):
                    state["momentum_buffer"] = g.clone()  # torch starts the buffer as a copy of the gradient
                elif bool(started.all()):
                    state["momentum_buffer"].mul_(mom).add_(g, alpha=1 - damp)
                else:
                    buf = state["momentum_buffer"]
                    buf.copy_(torch.where(self._per_run(started, p).bool(), buf.mul(mom).add_(g, alpha=1 - damp), g))
                buf = state["momentum_buffer"]
                g = g.add_(buf, alpha=mom) if hp["nesterov"] else buf
            p.add_(g, alpha=-lr)
            return
        beta1, beta2 = (float(b) for b in hp["betas"])
        eps = float(hp["eps"])
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        if wd != 0:
            if self.kind == "AdamW":
                p.mul_(1 - lr * wd)
            else:
                g = g.add_(p, alpha=wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if bool((steps == steps[0]).all()):
            # torch computes the bias corrections in Python floats; so do we when all runs agree
            s = int(steps[0])
            bc1, bc2 = 1 - beta1 ** s, 1 - beta2 ** s
            denom = torch.sqrt(exp_avg_sq, out=g).div_(bc2 ** 0.5).add_(eps)  # g is no longer needed
            p.addcdiv_(exp_avg, denom, value=-(lr / bc1))
            return
        s = steps.to(torch.float64)
        bc1 = 1 - torch.pow(torch.tensor(beta1, dtype=torch.float64), s)
        bc2 = 1 - torch.pow(torch.tensor(beta2, dtype=torch.float64), s)
        denom = (exp_avg_sq.sqrt() / self._per_run(bc2.sqrt(), p)).add_(eps)
        p.addcmul_(exp_avg / denom, self._per_run(lr / bc1, p), value=-1)


@torch.no_grad()
def clip_grad_norm_per_run(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` on each run's gradients; returns the norms [R]."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1)  # [R, n_tensors]
    total = torch.linalg.vector_norm(norms, dim=1)  # [R]
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as clip_grad_norm_: always multiplied, never amplified
    for g in grads:
        g.mul_(coef.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1))))
    return total
