"""The exact derivative gold standard (issue 16): further training differentiated with respect to
per-instance loss weights, in forward mode (chosen instances) and reverse mode (every instance).

The gold standard of docs/method.md is a difference of two trainings,
a_t(j, z) = loss(z, θ_t(D∖j)) − loss(z, θ_t(D)). Here every training instance i gets a loss weight
w_i (w = 1 is the full-data run) and the attribution is the first-order estimate of that difference,

    a_t(j, z) = Δw_j · ∂ℓ_z(θ_t(w)) / ∂w_j   at w = 1,

along exactly the trajectory of the full-data run of a seed: the same fresh optimizer (torch.optim
SGD with momentum / dampening / Nesterov / weight decay, Adam, AdamW: the arithmetic of
tda.further_training.optim), the same batches (`epoch_permutations(n, epochs, seed)`), per-run
gradient-norm clipping (`clip_grad_norm_`, differentiated), batch-norm running statistics updated
in train mode and carried along (their derivatives too), dropout masks fixed per (seed, step) as
tda.further_training.reference seeds them, test losses in eval mode at the checkpoint steps of
tda.further_training.checkpoints. No two nearly equal losses are subtracted, so float32 keeps its digits.

**Normalisations** (`normalisation=`), i.e. the loss of a step with batch B:

- ``"mask"`` (the default): Σ_{i∈B} w_i ℓ_i / Σ_{i∈B} w_i. At w_j = 0 this is exactly the `mask`
  removal run of reference.py (j is still forwarded, so it stays in its batch's batch-norm
  statistics and dropout draws; only its loss weight moves). Δw_j = −1, so the value returned is
  −∂ℓ_z/∂w_j, the first-order estimate of the `mask` gold standard's `diff`.
- ``"downweight"``: Σ_{i∈B} w_i ℓ_i / |B|. Down-weighting j by ε (ε = 1/n by default) takes
  w_j = 1 − nε: j's batch loses ε·n/|B| of ℓ_j once per epoch, the same total per epoch as
  reference.py's `downweight` run (which subtracts ε·ℓ_j at every one of the n/|B| steps). So
  Δw_j = −nε and the value returned is −nε·∂ℓ_z/∂w_j (= −∂ℓ_z/∂w_j for ε = 1/n). It equals the
  derivative of reference.py's `downweight` difference to first order in ε only up to *when* the
  ε·ℓ_j is subtracted within an epoch (spread over every step there, at j's step here): the two
  agree as the learning rate → 0 (tests/test_further_training_derivative.py measures how closely), and for a
  model with batch norm reference.py's `downweight` also changes the batch statistics (it
  forwards j as an extra row of every batch), which no loss weight can express.

`drop` (j deleted from the permutation, later batches shifted) has no derivative.

**Modes.** :meth:`WeightedTrajectory.forward_mode` carries one tangent per chosen instance through
the trajectory (``torch.func.jvp`` of one step, vectorised over the tangents with ``vmap``,
``randomness="same"`` so that every tangent sees the step's dropout masks), chunked to a memory
budget: [n_checkpoints, n_test, n_instances], the layout of a gold-standard seed's `diff`.
:meth:`WeightedTrajectory.reverse_mode` gives every training instance at once by an adjoint pass
backward through the stored trajectory (parameters, optimizer state and batch-norm buffers stored
every k steps, each segment recomputed forward, ``torch.func.vjp`` of one step vectorised over the
(checkpoint, test instance) cotangents): [n_checkpoints_chosen, n_test, n_train].

Models: any module through ``torch.func.functional_call`` (the MLP, CNNs with batch norm, ...);
batch-norm layers are replaced in a private copy by a functionally equivalent layer written in
plain tensor operations (torch's native kernel updates running statistics in place, invisible to
autograd). Forward mode on a Linear/ReLU stack (tda.models.structure.mlp_layers: the paper's MLP
without dropout) takes a fast path with the tangents batched by hand and, for one-hot inputs, the
first layer's weight columns gathered (tda.further_training.derivative_mlp; `fast_path=False`
forces the generic one). Reverse mode on the same models takes the hand-written adjoint of
tda.further_training.derivative_mlp_reverse (the optimizer's and the clipping's vector-Jacobian
products elementwise, the gradient's as a Hessian-vector product by batched matmuls, the one-hot
first layer gathered / scattered), else the generic vmap(vjp) path.

Caveat (a property of the training, not of this engine): a bias feeding a batch norm has a zero
gradient in exact arithmetic; Adam turns the rounding noise of that zero into updates ~lr that
reach the eval-mode running mean, so both estimators are noisy there (~1e-11 in float64).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from tda.further_training.checkpoints import checkpoint_steps, distance_from_start, steps_per_epoch
from tda.further_training.derivative_mlp import mlp_forward_chunk
from tda.further_training.derivative_mlp_reverse import mlp_reverse
from tda.further_training.functional_optim import optimizer_step
from tda.further_training.optim import optimizer_spec
from tda.further_training.reference import epoch_permutations, step_seed
from tda.models.base import per_example_loss
from tda.models.structure import mlp_layers, should_use_sparse

NORMALISATIONS = ("mask", "downweight")
_OPT_DEFAULTS = {"SGD": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
                 "Adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
                 "AdamW": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}}


# --------------------------------------------------------------------------- functional model
class _FunctionalBatchNorm(nn.Module):
    """nn.BatchNorm{1,2,3}d in plain tensor operations; train-mode batch statistics are reported
    through `stash` (module, mean, unbiased variance) instead of updating the buffers in place."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, stash: list):
        super().__init__()
        self.eps, self.momentum, self.affine = bn.eps, bn.momentum, bn.affine
        self.track_running_stats = bn.track_running_stats
        self.weight, self.bias = bn.weight, bn.bias  # the same Parameters (names kept)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name, None))
        self.stash = stash
        self.training = bn.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training or self.running_mean is None:
            mean = x.mean(dims)
            var = (x - mean.reshape(shape)).pow(2).mean(dims)
            if self.training and self.track_running_stats:
                count = x.numel() // x.shape[1]
                self.stash.append((self, mean, var * (count / max(count - 1, 1))))
        else:
            mean, var = self.running_mean, self.running_var
        out = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def functional_model(model: nn.Module) -> tuple[nn.Module, list]:
    """A copy of `model` with every batch-norm layer replaced by :class:`_FunctionalBatchNorm`
    (same parameter and buffer names), and the list its train-mode statistics are reported in."""
    model = copy.deepcopy(model)
    stash: list = []

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, _FunctionalBatchNorm(child, stash))
            else:
                swap(child)

    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ValueError("a bare batch-norm layer is not a model")
    swap(model)
    return model, stash


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class DerivativeResult:
    """derivative [n_checkpoints (chosen), n_test, n_instances] float64: the first-order estimate
    of loss(z, θ_t(w_j moved)) − loss(z, θ_t(D)) (see the module docstring for the scaling);
    full_loss [n_checkpoints, n_test] float64: the full-data run (w = 1) at every checkpoint;
    initial_loss [n_test] float64 at θᶠ; instances: the training indices of the last axis;
    checkpoints: the indices (into the run's checkpoint list) of the first axis; steps: the step
    clock of each checkpoint of the run; distance_from_start [n_checkpoints] float64: the full-data
    run's ‖θ_t − θ_0‖₂ over the trainable parameters; plan: how the work was chunked."""

    derivative: torch.Tensor
    full_loss: torch.Tensor
    initial_loss: torch.Tensor
    instances: torch.Tensor
    checkpoints: list[int]
    steps: list[int]
    distance_from_start: torch.Tensor
    plan: dict[str, Any] = field(default_factory=dict)


class WeightedTrajectory:
    """The full-data further-training run of one seed as a function of the loss weights w ∈ R^n.

    `optimizer`: a `further_optimizer` config node ({"_target_": "torch.optim.SGD", "lr": ...}) or
    a (kind, hyper-parameters) pair, kind in SGD / Adam / AdamW. The trajectory computes in the
    model's dtype on `device` (default: the model's device). Checkpoints: tda.further_training.
    checkpoints.checkpoint_steps of checkpoint_every / checkpoint_first / checkpoint_last."""

    def __init__(self, model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor, task: str, epochs: int, seed: int, batch_size: int, normalisation: str = "mask",
                 epsilon: float | None = None, clip_grad_norm: float | None = None, checkpoint_every: int | None = None,
                 device: torch.device | str | None = None, fast_path: bool = True, sparse_input: bool | str = "auto",
                 checkpoint_first: int | None = None, checkpoint_last: bool = False):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation={normalisation!r} is not one of {NORMALISATIONS} (the `drop` removal has no "
                             f"derivative)")
        if isinstance(optimizer, dict) or hasattr(optimizer, "items"):
            kind, hp = optimizer_spec(dict(optimizer))
        else:
            kind, hp = optimizer
        self.kind, self.hp = kind, _OPT_DEFAULTS[kind] | dict(hp)
        if kind == "SGD" and self.hp["nesterov"] and (self.hp["momentum"] <= 0 or self.hp["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening (as in torch.optim.SGD)")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # the Linear/ReLU fast path of forward mode (tda.further_training.derivative_mlp), and whether
        # it gathers the first layer's weight columns of row-sparse (one-hot) inputs
        layers = mlp_layers(model) if fast_path else None
        self.mlp_ops = None
        if layers is not None and x.dim() == 2 and isinstance(layers[0], nn.Linear):
            names = {id(m): k for k, m in model.named_modules()}
            self.mlp_ops = [("linear", _join(names[id(m)], "weight"), _join(names[id(m)], "bias") if m.bias is not None
                             else None) if isinstance(m, nn.Linear) else ("relu",) for m in layers
                            if not isinstance(m, nn.Flatten)]
        self.sparse = self.mlp_ops is not None and should_use_sparse(x, sparse_input)
        self.model, self.stash = functional_model(model)
        self.model.to(self.device).train()
        self.dtype = next(self.model.parameters()).dtype
        self.task, self.epochs, self.seed, self.batch_size = task, int(epochs), int(seed), int(batch_size)
        self.normalisation, self.clip = normalisation, clip_grad_norm
        self.x, self.y = self._inputs(x), y.to(self.device)
        self.x_test, self.y_test = self._inputs(x_test), y_test.to(self.device)
        self.n, self.n_test = len(x), len(x_test)
        self.epsilon = 1.0 / self.n if epsilon is None else float(epsilon)
        # Δw_j of the removal this estimates: the derivative is multiplied by −Δw_j... see docstring
        self.scale = 1.0 if normalisation == "mask" else self.n * self.epsilon
        self.perms = epoch_permutations(self.n, self.epochs, self.seed)
        self.steps_per_epoch = steps_per_epoch(self.n, self.batch_size)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.checkpoint_steps = checkpoint_steps(self.total_steps, self.steps_per_epoch,
                                                 int(checkpoint_every) if checkpoint_every else None,
                                                 checkpoint_first, checkpoint_last)
        named = dict(self.model.named_parameters())
        self.pnames = [k for k, p in named.items() if p.requires_grad]
        self.consts = {k: p.detach() for k, p in named.items() if not p.requires_grad}
        self.bnames = [k for k, b in self.model.named_buffers() if b.is_floating_point()]
        self.bn = [(m, prefix) for prefix, m in self.model.named_modules()
                   if isinstance(m, _FunctionalBatchNorm) and m.track_running_stats and m.running_mean is not None]
        self.nbt0 = {id(m): int(m.num_batches_tracked) if m.num_batches_tracked is not None else 0 for m, _ in self.bn}
        self.n_opt = (1 if self.hp["momentum"] != 0 else 0) if kind == "SGD" else 2

    # ------------------------------------------------------------------ pieces
    def initial_state(self) -> tuple[torch.Tensor, ...]:
        """(trainable parameters..., float buffers..., optimizer slots...) at θᶠ, fresh optimizer."""
        params = dict(self.model.named_parameters())
        bufs = dict(self.model.named_buffers())
        p = tuple(params[k].detach().clone() for k in self.pnames)
        b = tuple(bufs[k].detach().clone() for k in self.bnames)
        o = tuple(torch.zeros_like(t) for _ in range(self.n_opt) for t in p)
        return p + b + o

    def batch(self, clock: int) -> torch.Tensor:
        e, b = divmod(clock, self.steps_per_epoch)
        return self.perms[e][b * self.batch_size:(b + 1) * self.batch_size]

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)

    @staticmethod
    def _take(x, idx):
        return x[idx]

    def distance(self, state, start) -> torch.Tensor:
        """‖θ − θ_0‖₂ (float64 scalar) between the trainable parameters of two states of one layout."""
        P = len(self.pnames)
        return distance_from_start(state[:P], start[:P])

    def _split(self, state):
        P, Q = len(self.pnames), len(self.bnames)
        return state[:P], state[P:P + Q], state[P + Q:]

    def _tensors(self, params, bufs) -> dict[str, torch.Tensor]:
        return {**dict(zip(self.pnames, params)), **dict(zip(self.bnames, bufs)), **self.consts}

    def step_function(self, clock: int):
        """f(state, w_batch) -> state after step `clock` (0-based, the full run's clock); w_batch
        [|B|] are the loss weights of the batch's instances. Pure (dropout draws from the global
        generator: seed it with step_seed(seed, clock) before calling, as reference.py does)."""
        idx = self.batch(clock).to(self.device)
        xb, yb = self._take(self.x, idx), self.y[idx]
        s = clock + 1  # optimizer step count (every run starts fresh)
        hp, kind = self.hp, self.kind
        bn_index = {id(m): (self.bnames.index(f"{pre}.running_mean" if pre else "running_mean"),
                            self.bnames.index(f"{pre}.running_var" if pre else "running_var"))
                    for m, pre in self.bn}
        bn_factor = {id(m): (m.momentum if m.momentum is not None else 1.0 / (self.nbt0[id(m)] + s)) for m, _ in self.bn}

        def f(state, w):
            params, bufs, opt = self._split(state)

            def batch_loss(params):
                self.stash.clear()
                self.model.train()
                out = functional_call(self.model, self._tensors(params, bufs), (xb,))
                ell = per_example_loss(out, yb, self.task)
                c = w / w.sum() if self.normalisation == "mask" else w / len(w)
                stats = tuple(t for _, mean, var in self.stash for t in (mean, var))
                keys[:] = [id(m) for m, _, _ in self.stash]  # which layer each statistic belongs to
                self.stash.clear()
                return (c * ell).sum(), stats

            keys: list[int] = []
            g, stats = grad(batch_loss, has_aux=True)(params)
            g = list(g)
            if self.clip is not None:  # torch.nn.utils.clip_grad_norm_, never amplifying
                total = torch.sqrt(sum((t * t).sum() for t in g))
                coef = torch.clamp(float(self.clip) / (total + 1e-6), max=1.0)
                g = [t * coef for t in g]
            new_p, new_o = optimizer_step(kind, hp, list(params), g, list(opt), s)
            new_b = list(bufs)
            for k, key in enumerate(keys):  # running statistics: (1 − m)·running + m·batch, as torch
                im, iv = bn_index[key]
                mom = bn_factor[key]
                new_b[im] = mom * stats[2 * k] + (1 - mom) * bufs[im]
                new_b[iv] = mom * stats[2 * k + 1] + (1 - mom) * bufs[iv]
            return tuple(new_p) + tuple(new_b) + tuple(new_o)

        return f, idx

    def test_function(self):
        """f(state) -> [n_test] test losses in eval mode (the model's dtype)."""

        def f(state):
            params, bufs, _ = self._split(state)
            self.model.eval()
            try:
                out = functional_call(self.model, self._tensors(params, bufs), (self.x_test,))
            finally:
                self.model.train()
            return per_example_loss(out, self.y_test, self.task)

        return f

    # ------------------------------------------------------------------ plain trajectory
    @torch.no_grad()
    def losses(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Test losses [n_checkpoints, n_test] float64 of the run with loss weights `weights` [n]
        (None: w = 1, the full-data run)."""
        w_all = torch.ones(self.n, dtype=self.dtype, device=self.device) if weights is None \
            else weights.to(device=self.device, dtype=self.dtype)
        state, out = self.initial_state(), []
        test = self.test_function()
        with torch.random.fork_rng(devices=self._rng_devices()):
            for clock in range(self.total_steps):
                f, idx = self.step_function(clock)
                torch.manual_seed(step_seed(self.seed, clock))
                state = f(state, w_all[idx])
                if clock + 1 in self.checkpoint_steps:
                    out.append(test(state).double())
        return torch.stack(out)

    def initial_losses(self) -> torch.Tensor:
        with torch.no_grad():
            return self.test_function()(self.initial_state()).double()

    def _rng_devices(self):
        return [self.device] if self.device.type == "cuda" else []

    def state_numel(self) -> int:
        return sum(t.numel() for t in self.initial_state())

    def _activation_numel(self) -> int:
        total = 0

        def hook(_m, _i, out):
            nonlocal total
            if isinstance(out, torch.Tensor):
                total += out[0].numel()

        handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        try:
            with torch.no_grad():
                self.model.eval()
                self.model(self._take(self.x, torch.arange(2, device=self.device)))
        finally:
            self.model.train()
            self.stash.clear()
            for h in handles:
                h.remove()
        return total

    def _per_vector_bytes(self) -> int:
        """Memory one tangent (or cotangent) costs: its state, the gradient / optimizer
        temporaries of a differentiated step (~8 state-sized), a batch of activation tangents."""
        nbytes = torch.finfo(self.dtype).bits // 8
        return nbytes * (self.state_numel() * 8 + (self.batch_size + 1) * self._activation_numel() * 6)

    # ------------------------------------------------------------------ forward mode
    def forward_mode(self, instances: Sequence[int] | torch.Tensor, memory_budget_mb: float = 2048.0,
                     chunk: int | None = None) -> DerivativeResult:
        """a_t(j, z) for the training instances `instances` (J): derivative [n_checkpoints, n_test,
        len(J)], the tangents carried `chunk` at a time (default: as many as the budget allows)."""
        J = torch.as_tensor(instances, dtype=torch.long).flatten()
        if len(J) and (int(J.min()) < 0 or int(J.max()) >= self.n):
            raise ValueError(f"instances must be training indices in 0..{self.n - 1}")
        K = int(chunk) if chunk else max(1, int(memory_budget_mb * 2 ** 20 // self._per_vector_bytes()))
        K = max(1, min(K, max(len(J), 1)))
        fast = self.mlp_ops is not None and not self.bnames
        parts, full, distance = [], None, None
        for c0 in range(0, max(len(J), 1), K):  # every pass retraces the same full-data run
            d, full, distance = mlp_forward_chunk(self, J[c0:c0 + K]) if fast else self._forward_chunk(J[c0:c0 + K])
            parts.append(d)
        derivative = torch.cat(parts, dim=-1)[..., :len(J)]
        return DerivativeResult(derivative, full, self.initial_losses(), J, list(range(len(self.checkpoint_steps))),
                                list(self.checkpoint_steps), distance,
                                {"mode": "forward", "path": ("linear_relu_sparse" if self.sparse else "linear_relu")
                                 if fast else "generic", "tangents_per_pass": K, "passes": -(-len(J) // K) if len(J) else 1,
                                 "normalisation": self.normalisation, "scale": self.scale})

    def _forward_chunk(self, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(derivative [T, n_test, K], full losses [T, n_test], distance from the start [T]), float64."""
        K = max(len(J), 1)
        Jd = J.to(self.device)
        state = start = self.initial_state()
        tangents = tuple(torch.zeros((K, *t.shape), dtype=t.dtype, device=t.device) for t in state)
        test = self.test_function()
        derivs, full, distance = [], [], []
        with torch.random.fork_rng(devices=self._rng_devices()):
            for clock in range(self.total_steps):
                f, idx = self.step_function(clock)
                w = torch.ones(len(idx), dtype=self.dtype, device=self.device)
                tw = (Jd.unsqueeze(1) == idx.unsqueeze(0)).to(self.dtype) if len(J) else \
                    torch.zeros(K, len(idx), dtype=self.dtype, device=self.device)
                torch.manual_seed(step_seed(self.seed, clock))
                state, tangents = vmap(lambda ts, t: jvp(f, (state, w), (ts, t)), out_dims=(None, 0),
                                       randomness="same")(tangents, tw)
                if clock + 1 in self.checkpoint_steps:
                    loss, dloss = vmap(lambda ts: jvp(test, (state,), (ts,)), out_dims=(None, 0))(tangents)
                    full.append(loss.double())
                    derivs.append(-self.scale * dloss.double().T)  # [n_test, K]
                    distance.append(self.distance(state, start))
        return torch.stack(derivs).cpu(), torch.stack(full).cpu(), torch.stack(distance)

    # ------------------------------------------------------------------ reverse mode
    def reverse_mode(self, checkpoints: Sequence[int] | None = None, memory_budget_mb: float = 2048.0,
                     store_every: int | None = None, cotangents_per_sweep: int | None = None) -> DerivativeResult:
        """a_t(j, z) for every training instance j: derivative [len(checkpoints), n_test, n_train].

        `checkpoints`: indices into the run's checkpoint list (default: all). The state is stored
        every `store_every` steps (default ⌈√steps⌉) and each segment recomputed on the way back;
        the (checkpoint, test instance) cotangents are carried `cotangents_per_sweep` at a time
        (default: as many as half the budget allows), one backward sweep per group."""
        chosen = list(range(len(self.checkpoint_steps))) if checkpoints is None else [int(c) for c in checkpoints]
        if not chosen or any(not 0 <= c < len(self.checkpoint_steps) for c in chosen):
            raise ValueError(f"checkpoints must be indices in 0..{len(self.checkpoint_steps) - 1}")
        n_test = self.n_test
        pairs = [(c, z) for c in chosen for z in range(n_test)]
        per_vec = self._per_vector_bytes()
        M = int(cotangents_per_sweep) if cotangents_per_sweep else \
            max(1, int(memory_budget_mb * 2 ** 20 / 2 // per_vec))
        M = min(M, len(pairs))
        end = max(self.checkpoint_steps[c] for c in chosen)
        k = int(store_every) if store_every else max(1, math.isqrt(end - 1) + 1)
        if self.mlp_ops is not None and not self.bnames:  # the Linear/ReLU fast path
            result, full_loss, distance, n_stored = mlp_reverse(self, chosen, M, k)
            return self._reverse_result(result, full_loss, distance, chosen, M, len(pairs), k, n_stored,
                                        "linear_relu_sparse" if self.sparse else "linear_relu")
        # forward sweep: stored states every k steps, the full run's test losses (and distance from
        # the start) at every checkpoint
        stored, full, distance = {}, [], []
        test = self.test_function()
        state = start = self.initial_state()
        with torch.no_grad(), torch.random.fork_rng(devices=self._rng_devices()):
            for clock in range(self.total_steps):
                if clock % k == 0 and clock < end:
                    stored[clock] = state
                f, idx = self.step_function(clock)
                torch.manual_seed(step_seed(self.seed, clock))
                state = f(state, torch.ones(len(idx), dtype=self.dtype, device=self.device))
                if clock + 1 in self.checkpoint_steps:
                    full.append(test(state).double())
                    distance.append(self.distance(state, start))
        full_loss = torch.stack(full).cpu()
        result = torch.zeros(len(pairs), self.n, dtype=torch.float64)
        for p0 in range(0, len(pairs), M):
            result[p0:p0 + M] = self._backward_sweep(pairs[p0:p0 + M], stored, k, end).cpu()
        return self._reverse_result(result, full_loss, torch.stack(distance), chosen, M, len(pairs), k, len(stored),
                                    "generic")

    def _reverse_result(self, result, full_loss, distance, chosen, M, n_pairs, k, n_stored, path) -> DerivativeResult:
        derivative = (-self.scale * result).reshape(len(chosen), self.n_test, self.n)
        return DerivativeResult(derivative, full_loss, self.initial_losses(), torch.arange(self.n), chosen,
                                list(self.checkpoint_steps), distance,
                                {"mode": "reverse", "path": path, "cotangents_per_sweep": M,
                                 "sweeps": -(-n_pairs // M), "store_every": k, "stored_states": n_stored,
                                 "normalisation": self.normalisation, "scale": self.scale})

    def _backward_sweep(self, pairs: list[tuple[int, int]], stored: dict, k: int, end: int) -> torch.Tensor:
        """∂ℓ_z(θ_{T_c}) / ∂w [len(pairs), n] for the (checkpoint c, test instance z) pairs."""
        m, n_test = len(pairs), self.n_test
        test = self.test_function()
        inject: dict[int, list[tuple[int, int]]] = {}  # clock -> [(row, z)]
        for row, (c, z) in enumerate(pairs):
            inject.setdefault(self.checkpoint_steps[c], []).append((row, z))
        lam = None
        gw = torch.zeros(m, self.n, dtype=self.dtype, device=self.device)
        with torch.random.fork_rng(devices=self._rng_devices()):
            for seg in sorted((s for s in stored if s < end), reverse=True):
                seg_end = min(seg + k, end)
                states = [stored[seg]]
                with torch.no_grad():  # recompute the segment
                    for clock in range(seg, seg_end):
                        f, idx = self.step_function(clock)
                        torch.manual_seed(step_seed(self.seed, clock))
                        states.append(f(states[-1], torch.ones(len(idx), dtype=self.dtype, device=self.device)))
                for clock in range(seg_end - 1, seg - 1, -1):
                    after = states[clock + 1 - seg]
                    if clock + 1 in inject:  # a checkpoint of some pairs: seed their adjoints
                        rows = torch.tensor([r for r, _ in inject[clock + 1]], device=self.device)
                        onehot = torch.zeros(len(rows), n_test, dtype=self.dtype, device=self.device)
                        onehot[torch.arange(len(rows)), torch.tensor([z for _, z in inject[clock + 1]])] = 1
                        _, vjp_test = vjp(test, after)
                        (seeded,) = vmap(vjp_test)(onehot)
                        if lam is None:
                            lam = tuple(torch.zeros((m, *t.shape), dtype=t.dtype, device=t.device) for t in after)
                        lam = tuple(l.index_add(0, rows, s) for l, s in zip(lam, seeded))
                    if lam is None:
                        continue
                    f, idx = self.step_function(clock)
                    torch.manual_seed(step_seed(self.seed, clock))
                    _, vjp_step = vjp(f, states[clock - seg], torch.ones(len(idx), dtype=self.dtype, device=self.device))
                    lam, g_w = vmap(vjp_step)(lam)
                    gw.index_add_(1, idx.to(self.device), g_w)
                    lam = tuple(t.detach() for t in lam)
                del states
        return gw.double()


# --------------------------------------------------------------------------- conveniences
def derivative_forward(model: nn.Module, optimizer, x, y, x_test, y_test, task: str, epochs: int, seed: int,
                       batch_size: int, instances, normalisation: str = "mask", epsilon: float | None = None,
                       clip_grad_norm: float | None = None, checkpoint_every: int | None = None,
                       memory_budget_mb: float = 2048.0, device=None) -> DerivativeResult:
    """Forward mode for one seed: derivative [n_checkpoints, n_test, len(instances)] (cf. `diff`)."""
    traj = WeightedTrajectory(model, optimizer, x, y, x_test, y_test, task, epochs, seed, batch_size, normalisation,
                              epsilon, clip_grad_norm, checkpoint_every, device)
    return traj.forward_mode(instances, memory_budget_mb)


def derivative_reverse(model: nn.Module, optimizer, x, y, x_test, y_test, task: str, epochs: int, seed: int,
                       batch_size: int, checkpoints: Sequence[int] | None = None, normalisation: str = "mask",
                       epsilon: float | None = None, clip_grad_norm: float | None = None,
                       checkpoint_every: int | None = None, memory_budget_mb: float = 2048.0,
                       store_every: int | None = None, device=None) -> DerivativeResult:
    """Reverse mode for one seed: derivative [len(checkpoints), n_test, n_train] for every instance."""
    traj = WeightedTrajectory(model, optimizer, x, y, x_test, y_test, task, epochs, seed, batch_size, normalisation,
                              epsilon, clip_grad_norm, checkpoint_every, device)
    return traj.reverse_mode(checkpoints, memory_budget_mb, store_every)
