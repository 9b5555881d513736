"""The exact derivative gold standard: further training differentiated with respect to
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

- ``"mask"``: Σ_{i∈B} w_i ℓ_i / Σ_{i∈B} w_i. At w_j = 0 this is exactly the `mask`
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
plain tensor operations (tda.further_training.functional_model). The run as a function of w, with
its generic tangent and adjoint steps, is tda.further_training.weighted_run; this module drives
them. On a Linear/ReLU stack (tda.models.structure.linear_relu_stack: the paper's MLP without
dropout) the modes drive hand-written steps instead: forward mode with the tangents batched by
hand and, for one-hot inputs, the first layer's weight columns gathered
(tda.further_training.derivative_mlp), reverse mode the hand-written adjoint of
tda.further_training.derivative_mlp_reverse (the optimizer's and the clipping's vector-Jacobian
products elementwise, the gradient's as a Hessian-vector product by batched matmuls, the one-hot
first layer gathered / scattered); both read the run through a typed
:class:`~tda.further_training.derivative_mlp.StackTrajectory`, and `fast_path=False` forces the
generic steps.

Caveat (a property of the training, not of this engine): a bias feeding a batch norm has a zero
gradient in exact arithmetic; Adam turns the rounding noise of that zero into updates ~lr that
reach the eval-mode running mean, so both estimators are noisy there (~1e-11 in float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tda.further_training.derivative_mlp import MLPTangents
from tda.further_training.derivative_mlp_reverse import MLPAdjoint
from tda.further_training.weighted_run import WeightedRun


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


class TangentSteps(Protocol):
    """What forward mode carries along the run: WeightedRun's generic steps, or MLPTangents.
    States are tuples / lists of tensors in the path's own layout; tangents have a leading [K]."""

    def initial_state(self) -> Sequence[torch.Tensor]: ...

    def tangent_step(self, state, tangents, clock: int, tw: torch.Tensor) -> tuple[Any, Any]:
        """(state, tangents) after step `clock`; tw [K, B]: the tangents of the batch's loss weights."""

    def test_tangents(self, state, tangents) -> tuple[torch.Tensor, torch.Tensor]:
        """Test losses [n_test] and their tangents [K, n_test]."""


class AdjointSteps(Protocol):
    """What reverse mode carries back along the run: WeightedRun's generic steps, or MLPAdjoint.
    Adjoints λ have a leading [M] (one per (checkpoint, test instance) pair)."""

    def initial_state(self) -> Sequence[torch.Tensor]: ...

    def step(self, state, clock: int) -> Sequence[torch.Tensor]:
        """The state after step `clock` of the full run (w = 1)."""

    def test_losses(self, state) -> torch.Tensor:
        """[n_test] test losses at `state`."""

    def seed_adjoints(self, after, lam, rows: torch.Tensor, zs: list[int]) -> Any:
        """λ with the gradients of the test losses of instances zs added at rows [len(zs)]."""

    def adjoint_step(self, before, after, lam, clock: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(λ before step `clock`, ∂⟨λ, state after⟩/∂w_batch [M, B], the batch's rows [B])."""


class WeightedTrajectory(WeightedRun):
    """The full-data further-training run of one seed (:class:`~tda.further_training.weighted_run.
    WeightedRun`: the constructor's arguments, the run as a function of the loss weights) and its
    derivative in them, by forward or reverse mode. Both modes drive one set of steps: the run's
    generic ones, or on a Linear/ReLU stack the hand-written MLPTangents / MLPAdjoint."""

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
        steps: TangentSteps = self if self.fast is None else MLPTangents(self.fast)
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

    def _forward_pass(self, steps: TangentSteps, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass of K = max(len(J), 1) tangents, the derivatives in the loss weights of the
        training instances J [K], along the full run: (derivative [T, n_test, K], full losses
        [T, n_test], distance from the start [T]), float64."""
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
        steps: AdjointSteps = self if self.fast is None else MLPAdjoint(self.fast)
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

    def _backward_sweep(self, steps: AdjointSteps, pairs: list[tuple[int, int]], stored: dict, k: int,
                        end: int) -> torch.Tensor:
        """∂ℓ_z(θ_{T_c}) / ∂w [len(pairs), n] float64 for the (checkpoint c, test instance z) pairs:
        the adjoints carried back from the last checkpoint, each segment of `k` steps recomputed
        from its stored state."""
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
