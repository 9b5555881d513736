"""SGD, Adam and AdamW as a pure function of (parameters, gradients, state, step): the
optimizer step the derivative engine differentiates (tda.further_training.derivative), with
the arithmetic of torch.optim (and of tda.further_training.optim, its stacked form)."""

from __future__ import annotations

from typing import Any

import torch


def safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v with derivative 0 where v == 0 (an Adam second moment that never saw a non-zero
    gradient: the true derivative of the update there is dm / eps, which this gives); the inner
    `where` keeps autograd from forming sqrt's infinite derivative at 0."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def optimizer_step(kind: str, hp: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                   state: list[torch.Tensor], step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(new parameters, new state) after optimizer step number `step` (1-based). `state`: SGD's
    momentum buffers (none without momentum), or Adam's / AdamW's first moments followed by
    their second moments, one per parameter; ignored at step 1 for SGD, as torch does."""
    lr, wd = float(hp["lr"]), float(hp["weight_decay"])
    if kind == "SGD":
        mom, damp = float(hp["momentum"]), float(hp["dampening"])
        new_p, bufs = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            if wd != 0:
                g = g + wd * p
            if mom != 0:
                buf = g if step == 1 else state[i] * mom + (1 - damp) * g
                bufs.append(buf)
                g = g + mom * buf if hp["nesterov"] else buf
            new_p.append(p - lr * g)
        return new_p, bufs
    b1, b2 = (float(b) for b in hp["betas"])
    eps = float(hp["eps"])
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    P = len(params)
    new_p, ms, vs = [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        if wd != 0:
            if kind == "AdamW":
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p
        m = torch.lerp(state[i], g, 1 - b1)
        v = torch.addcmul(state[P + i] * b2, g, g, value=1 - b2)
        new_p.append(torch.addcdiv(p, m, safe_sqrt(v) / bc2 ** 0.5 + eps, value=-(lr / bc1)))
        ms.append(m)
        vs.append(v)
    return new_p, ms + vs
