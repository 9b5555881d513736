"""The full-data further-training run of one seed as a pure function of per-instance loss weights
w ∈ R^n (w = 1: the run itself), which tda.further_training.derivative differentiates.

:class:`WeightedRun` holds the run's state (trainable parameters, batch-norm buffers, optimizer
slots), one step f(state, w_batch) with the arithmetic of tda.further_training.reference (the
normalisations of the loss are described in tda.further_training.derivative), the eval-mode test
losses, and the generic (torch.func) tangent and adjoint of one step that the derivative's two
modes carry along the run. On a Linear/ReLU stack it also offers the typed
:class:`~tda.further_training.derivative_mlp.StackTrajectory` the hand-written fast paths read.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from tda.further_training.checkpoints import distance_from_start
from tda.further_training.derivative_mlp import StackTrajectory
from tda.further_training.functional_model import FunctionalBatchNorm, functional_model
from tda.further_training.functional_optim import optimizer_step
from tda.further_training.optim import optimizer_spec, with_defaults
from tda.further_training.reference import epoch_permutations, step_seed
from tda.further_training.settings import FurtherTrainingSettings
from tda.memory import activation_numel
from tda.models.base import per_example_loss
from tda.models.structure import linear_relu_stack, should_use_sparse

NORMALISATIONS = ("mask", "downweight")  # the removals a loss weight can express


class WeightedRun:
    """The full-data further-training run of one seed as a function of the loss weights w ∈ R^n.

    `optimizer`: a `further_optimizer` config node ({"_target_": "torch.optim.SGD", "lr": ...}) or
    a (kind, hyper-parameters) pair, kind in SGD / Adam / AdamW. `settings`: the further-training
    settings the run follows: epochs, batch_size, removal (the normalisation: mask | downweight),
    epsilon, clip_grad_norm, the checkpoint schedule (FurtherTrainingSettings.checkpoint_steps) and
    sparse_input. The run computes in the model's dtype on `device` (default: the model's
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
        # −Δw_j of the removal estimated (tda.further_training.derivative)
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
        # a layer's momentum, or (momentum=None) the cumulative average's 1 / (batches seen)
        bn_factor = {id(m): m.momentum if m.momentum is not None else 1.0 / (self.nbt0[id(m)] + s) for m, _ in self.bn}

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

    def test_losses(self, state) -> torch.Tensor:
        """[n_test] test losses in eval mode (the model's dtype) at `state`."""
        params, bufs, _ = self._split(state)
        self.model.eval()
        try:
            out = functional_call(self.model, self._tensors(params, bufs), (self.x_test,))
        finally:
            self.model.train()
        return per_example_loss(out, self.y_test, self.task)

    # ------------------------------------------------------------------ plain trajectory
    @torch.no_grad()
    def losses(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Test losses [n_checkpoints, n_test] float64 of the run with loss weights `weights` [n]
        (None: w = 1, the full-data run)."""
        w_all = torch.ones(self.n, dtype=self.dtype, device=self.device) if weights is None \
            else weights.to(device=self.device, dtype=self.dtype)
        state, out = self.initial_state(), []
        with torch.random.fork_rng(devices=self._rng_devices()):
            for clock in range(self.total_steps):
                f, idx = self.step_function(clock)
                torch.manual_seed(step_seed(self.seed, clock))
                state = f(state, w_all[idx])
                if clock + 1 in self.checkpoint_steps:
                    out.append(self.test_losses(state).double())
        return torch.stack(out)

    def initial_losses(self) -> torch.Tensor:
        with torch.no_grad():
            return self.test_losses(self.initial_state()).double()

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

    # ------------------------------------------------------------------ the generic path's steps
    # (torch.func; tda.further_training.derivative.TangentSteps and AdjointSteps)
    def tangent_step(self, state, tangents, clock: int, tw: torch.Tensor):
        """(state, tangents [K, ...]) after step `clock`; tw [K, B]: the tangents of the batch's weights."""
        f, idx = self.step_function(clock)
        w = torch.ones(len(idx), dtype=self.dtype, device=self.device)
        torch.manual_seed(step_seed(self.seed, clock))
        return vmap(lambda ts, t: jvp(f, (state, w), (ts, t)), out_dims=(None, 0), randomness="same")(tangents, tw)

    def test_tangents(self, state, tangents):
        """Test losses [n_test] and their tangents [K, n_test]."""
        return vmap(lambda ts: jvp(self.test_losses, (state,), (ts,)), out_dims=(None, 0))(tangents)

    def step(self, state, clock: int):
        """The state after step `clock` of the full run (w = 1)."""
        f, idx = self.step_function(clock)
        torch.manual_seed(step_seed(self.seed, clock))
        return f(state, torch.ones(len(idx), dtype=self.dtype, device=self.device))

    def seed_adjoints(self, after, lam, rows: torch.Tensor, zs: list[int]):
        """λ (list of [M, ...]) with the gradients of the test losses of instances zs added at rows."""
        onehot = torch.zeros(len(rows), self.n_test, dtype=self.dtype, device=self.device)
        onehot[torch.arange(len(rows)), torch.tensor(zs)] = 1
        _, vjp_test = vjp(self.test_losses, after)
        (seeded,) = vmap(vjp_test)(onehot)
        return tuple(a.index_add(0, rows, s) for a, s in zip(lam, seeded))

    def adjoint_step(self, before, after, lam, clock: int):
        """(λ before step `clock`, ∂⟨λ, state after⟩/∂w_batch [M, B], the batch's indices [B])."""
        f, idx = self.step_function(clock)
        torch.manual_seed(step_seed(self.seed, clock))
        _, vjp_step = vjp(f, before, torch.ones(len(idx), dtype=self.dtype, device=self.device))
        lam, g_w = vmap(vjp_step)(lam)
        return tuple(t.detach() for t in lam), g_w, idx
