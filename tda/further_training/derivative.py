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

**Normalisations** (`further_training.removal`), i.e. the loss of a step with batch B:

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
plain tensor operations (tda.further_training.functional_model). Forward mode on a Linear/ReLU
stack (tda.models.structure.linear_relu_stack: the paper's MLP without dropout) takes a fast path
with the tangents batched by hand and, for one-hot inputs, the first layer's weight columns
gathered (tda.further_training.derivative_mlp; `fast_path=False` forces the generic one). Reverse
mode on the same models takes the hand-written adjoint of
tda.further_training.derivative_mlp_reverse (the optimizer's and the clipping's vector-Jacobian
products elementwise, the gradient's as a Hessian-vector product by batched matmuls, the one-hot
first layer gathered / scattered), else the generic vmap(vjp) path. Both fast paths read the run
through a :class:`~tda.further_training.derivative_mlp.StackTrajectory`.

Caveat (a property of the training, not of this engine): a bias feeding a batch norm has a zero
gradient in exact arithmetic; Adam turns the rounding noise of that zero into updates ~lr that
reach the eval-mode running mean, so both estimators are noisy there (~1e-11 in float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from tda.further_training.checkpoints import distance_from_start
from tda.further_training.derivative_mlp import MLPTangents, StackTrajectory
from tda.further_training.derivative_mlp_reverse import MLPAdjoint
from tda.further_training.functional_model import FunctionalBatchNorm, functional_model
from tda.further_training.functional_optim import optimizer_step
from tda.further_training.optim import optimizer_spec, with_defaults
from tda.further_training.reference import epoch_permutations, step_seed
from tda.further_training.settings import FurtherTrainingSettings
from tda.memory import activation_numel
from tda.models.base import per_example_loss
from tda.models.structure import linear_relu_stack, should_use_sparse

NORMALISATIONS = ("mask", "downweight")  # the removals a loss weight can express


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
    a (kind, hyper-parameters) pair, kind in SGD / Adam / AdamW. `settings`: the further-training
    settings the run follows: epochs, batch_size, removal (the normalisation: mask | downweight),
    epsilon, clip_grad_norm, the checkpoint schedule (FurtherTrainingSettings.checkpoint_steps) and
    sparse_input. The trajectory computes in the model's dtype on `device` (default: the model's
    device); `fast_path=False` keeps a Linear/ReLU stack on the generic path."""

    def __init__(self, model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor, task: str, settings: FurtherTrainingSettings, seed: int,
                 device: torch.device | str | None = None, fast_path: bool = True):
        if settings.removal not in NORMALISATIONS:
            raise ValueError(f"further_training.removal={settings.removal!r} has no derivative (deleting an instance "
                             f"from its batches moves no loss weight); use further_training.removal=mask or "
                             f"further_training.removal=downweight")
        if isinstance(optimizer, dict) or hasattr(optimizer, "items"):
            kind, hp = optimizer_spec(dict(optimizer))
        else:
            kind, hp = optimizer
        self.kind, self.hp = kind, with_defaults(kind, hp)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.settings = settings
        self.model, self.stash = functional_model(model)
        self.model.to(self.device).train()
        self.dtype = next(self.model.parameters()).dtype
        self.task, self.seed = task, int(seed)
        self.epochs, self.batch_size = settings.epochs, settings.batch_size
        self.normalisation, self.clip = settings.removal, settings.clip_grad_norm
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.x_test, self.y_test = x_test.to(self.device), y_test.to(self.device)
        self.n, self.n_test = len(x), len(x_test)
        self.epsilon = 1.0 / self.n if settings.epsilon is None else float(settings.epsilon)
        # −Δw_j of the removal this estimates (see the module docstring)
        self.scale = 1.0 if self.normalisation == "mask" else self.n * self.epsilon
        self.perms = epoch_permutations(self.n, self.epochs, self.seed)
        self.steps_per_epoch = settings.steps_per_epoch(self.n)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.checkpoint_steps = settings.checkpoint_steps(self.n)
        named = dict(self.model.named_parameters())
        self.pnames = [k for k, p in named.items() if p.requires_grad]
        self.consts = {k: p.detach() for k, p in named.items() if not p.requires_grad}
        self.bnames = [k for k, b in self.model.named_buffers() if b.is_floating_point()]
        self.bn = [(m, prefix) for prefix, m in self.model.named_modules()
                   if isinstance(m, FunctionalBatchNorm) and m.track_running_stats and m.running_mean is not None]
        self.nbt0 = {id(m): int(m.num_batches_tracked) if m.num_batches_tracked is not None else 0 for m, _ in self.bn}
        self.n_opt = (1 if self.hp["momentum"] != 0 else 0) if kind == "SGD" else 2
        # the Linear/ReLU fast paths (tda.further_training.derivative_mlp, derivative_mlp_reverse)
        stack = linear_relu_stack(self.model) if fast_path and x.dim() == 2 and not self.bnames else None
        self.fast: StackTrajectory | None = None if stack is None else StackTrajectory(
            stack=stack, params=tuple(named[k].detach() for k in stack.names), optimizer=kind, hp=self.hp,
            n_slots=self.n_opt, clip=self.clip, task=task, normalisation=self.normalisation, x=self.x, y=self.y,
            x_test=self.x_test, y_test=self.y_test, sparse=should_use_sparse(x, settings.sparse_input),
            batch=self.batch)

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
        xb, yb = self.x[idx], self.y[idx]
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

    def _per_vector_bytes(self) -> int:
        """Memory one tangent (or cotangent) costs: its state, the gradient / optimizer
        temporaries of a differentiated step (~8 state-sized), a batch of activation tangents."""
        nbytes = torch.finfo(self.dtype).bits // 8
        state_numel = sum(t.numel() for t in self.initial_state())
        return nbytes * (state_numel * 8 + (self.batch_size + 1) * activation_numel(self.model, self.x[:1]) * 6)

    @property
    def path(self) -> str:
        """Which steps the modes run: linear_relu(_sparse) (the fast paths) or generic."""
        if self.fast is None:
            return "generic"
        return "linear_relu_sparse" if self.fast.sparse else "linear_relu"

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
        steps = self if self.fast is None else MLPTangents(self.fast)
        parts, full, distance = [], None, None
        for c0 in range(0, max(len(J), 1), K):  # every pass retraces the same full-data run
            d, full, distance = self._forward_pass(steps, J[c0:c0 + K])
            parts.append(d)
        derivative = torch.cat(parts, dim=-1)[..., :len(J)]
        return DerivativeResult(derivative, full, self.initial_losses(), J, list(range(len(self.checkpoint_steps))),
                                list(self.checkpoint_steps), distance,
                                {"mode": "forward", "path": self.path, "tangents_per_pass": K,
                                 "passes": -(-len(J) // K) if len(J) else 1, "normalisation": self.normalisation,
                                 "scale": self.scale})

    def _forward_pass(self, steps, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass of K = max(len(J), 1) tangents, the derivatives in the loss weights of the
        training instances J [K], along the full run: (derivative [T, n_test, K], full losses
        [T, n_test], distance from the start [T]), float64. `steps`: the path's initial_state,
        tangent_step and test_tangents (the generic ones below, or derivative_mlp.MLPTangents)."""
        K = max(len(J), 1)
        Jd = J.to(self.device)
        state = start = steps.initial_state()
        tangents = tuple(torch.zeros((K, *t.shape), dtype=t.dtype, device=t.device) for t in state)
        derivs, full, distance = [], [], []
        with torch.random.fork_rng(devices=self._rng_devices()):
            for clock in range(self.total_steps):
                idx = self.batch(clock).to(self.device)
                tw = (Jd.unsqueeze(1) == idx.unsqueeze(0)).to(self.dtype) if len(J) else \
                    torch.zeros(K, len(idx), dtype=self.dtype, device=self.device)
                state, tangents = steps.tangent_step(state, tangents, clock, tw)
                if clock + 1 in self.checkpoint_steps:
                    loss, dloss = steps.test_tangents(state, tangents)
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
        pairs = [(c, z) for c in chosen for z in range(self.n_test)]
        M = int(cotangents_per_sweep) if cotangents_per_sweep else \
            max(1, int(memory_budget_mb * 2 ** 20 / 2 // self._per_vector_bytes()))
        M = min(M, len(pairs))
        end = max(self.checkpoint_steps[c] for c in chosen)
        k = int(store_every) if store_every else max(1, math.isqrt(end - 1) + 1)
        steps = self if self.fast is None else MLPAdjoint(self.fast)
        # forward sweep: stored states every k steps, the full run's test losses (and distance from
        # the start) at every checkpoint
        stored, full, distance = {}, [], []
        with torch.no_grad(), torch.random.fork_rng(devices=self._rng_devices()):
            state = start = steps.initial_state()
            for clock in range(self.total_steps):
                if clock % k == 0 and clock < end:
                    stored[clock] = state
                state = steps.step(state, clock)
                if clock + 1 in self.checkpoint_steps:
                    full.append(steps.test_losses(state).double())
                    distance.append(self.distance(state, start))
        result = torch.zeros(len(pairs), self.n, dtype=torch.float64)
        for p0 in range(0, len(pairs), M):
            result[p0:p0 + M] = self._backward_sweep(steps, pairs[p0:p0 + M], stored, k, end).cpu()
        derivative = (-self.scale * result).reshape(len(chosen), self.n_test, self.n)
        return DerivativeResult(derivative, torch.stack(full).cpu(), self.initial_losses(), torch.arange(self.n),
                                chosen, list(self.checkpoint_steps), torch.stack(distance),
                                {"mode": "reverse", "path": self.path, "cotangents_per_sweep": M,
                                 "sweeps": -(-len(pairs) // M), "store_every": k, "stored_states": len(stored),
                                 "normalisation": self.normalisation, "scale": self.scale})

    def _backward_sweep(self, steps, pairs: list[tuple[int, int]], stored: dict, k: int, end: int) -> torch.Tensor:
        """∂ℓ_z(θ_{T_c}) / ∂w [len(pairs), n] float64 for the (checkpoint c, test instance z) pairs:
        the adjoints carried back from the last checkpoint, each segment of `k` steps recomputed
        from its stored state. `steps`: the path's step, seed_adjoints and adjoint_step (the
        generic ones below, or derivative_mlp_reverse.MLPAdjoint)."""
        m = len(pairs)
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
                        states.append(steps.step(states[-1], clock))
                for clock in range(seg_end - 1, seg - 1, -1):
                    after = states[clock + 1 - seg]
                    if clock + 1 in inject:  # a checkpoint of some pairs: seed their adjoints
                        rows = torch.tensor([r for r, _ in inject[clock + 1]], device=self.device)
                        if lam is None:
                            lam = [torch.zeros((m, *t.shape), dtype=t.dtype, device=t.device) for t in after]
                        lam = steps.seed_adjoints(after, lam, rows, [z for _, z in inject[clock + 1]])
                    if lam is None:
                        continue
                    lam, g_w, idx = steps.adjoint_step(states[clock - seg], after, lam, clock)
                    gw.index_add_(1, idx.to(self.device), g_w)
                del states
        return gw.double()

    # ------------------------------------------------------------------ the generic path's steps
    def tangent_step(self, state, tangents, clock: int, tw: torch.Tensor):
        """(state, tangents [K, ...]) after step `clock`; tw [K, B]: the tangents of the batch's weights."""
        f, idx = self.step_function(clock)
        w = torch.ones(len(idx), dtype=self.dtype, device=self.device)
        torch.manual_seed(step_seed(self.seed, clock))
        return vmap(lambda ts, t: jvp(f, (state, w), (ts, t)), out_dims=(None, 0), randomness="same")(tangents, tw)

    def test_tangents(self, state, tangents):
        """Test losses [n_test] and their tangents [K, n_test]."""
        test = self.test_function()
        return vmap(lambda ts: jvp(test, (state,), (ts,)), out_dims=(None, 0))(tangents)

    def step(self, state, clock: int):
        """The state after step `clock` of the full run (w = 1)."""
        f, idx = self.step_function(clock)
        torch.manual_seed(step_seed(self.seed, clock))
        return f(state, torch.ones(len(idx), dtype=self.dtype, device=self.device))

    def test_losses(self, state) -> torch.Tensor:
        return self.test_function()(state)

    def seed_adjoints(self, after, lam, rows: torch.Tensor, zs: list[int]):
        """λ (list of [M, ...]) with the gradients of the test losses of instances zs added at rows."""
        onehot = torch.zeros(len(rows), self.n_test, dtype=self.dtype, device=self.device)
        onehot[torch.arange(len(rows)), torch.tensor(zs)] = 1
        _, vjp_test = vjp(self.test_function(), after)
        (seeded,) = vmap(vjp_test)(onehot)
        return tuple(a.index_add(0, rows, s) for a, s in zip(lam, seeded))

    def adjoint_step(self, before, after, lam, clock: int):
        """(λ before step `clock`, ∂⟨λ, state after⟩/∂w_batch [M, B], the batch's indices [B])."""
        f, idx = self.step_function(clock)
        torch.manual_seed(step_seed(self.seed, clock))
        _, vjp_step = vjp(f, before, torch.ones(len(idx), dtype=self.dtype, device=self.device))
        lam, g_w = vmap(vjp_step)(lam)
        return tuple(t.detach() for t in lam), g_w, idx
