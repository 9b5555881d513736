"""Final-model training with Lightning: the model the whole study starts from (θᶠ), and its
settings: the `train` section and the `trainer` section (tda's own keys, and any argument of
Lightning's `Trainer`, passed through)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tda.config import ConfigError, to_container
from tda.exits import DivergedError
from tda.models.base import TDAModel, per_example_loss
from tda.sections import KEYED_UNLESS_DEFAULT, NOT_KEYED, Checks, Section, setting, unknown_key

# float16 mixed precision is not offered: Lightning silently runs it as bf16 on a CPU
PRECISION = {"float32": "32-true", "float64": "64-true", "bf16": "bf16-mixed"}


@dataclass(frozen=True)
class TrainSettings(Section):
    """`train`: final training (its :meth:`keyed` settings are part of the run directory's key)."""

    PATH = "train"
    epochs: int = setting(30, "epochs of final training", "train for at least one epoch")
    batch_size: int = setting(32, "batch size of final training")
    dtype: Literal["float32", "float64", "bf16"] = setting("float32", "precision of final training",
                                                           "for mixed precision use train.dtype=bf16")
    gradient_clip_val: float | None = setting(None, "gradient norm clipping (Lightning's); null: none")
    eval_every_epochs: int = setting(1, "test-set metrics every this many epochs")
    # whether to redo the run, not what the run is: the same directory either way
    overwrite: bool = setting(False, "retrain even if the run directory holds a final model", key=NOT_KEYED)
    final_checkpoint: Literal["last", "best_accuracy", "best_loss"] = setting(
        "last", "the final model: the weights after the last epoch, or those of the evaluated epoch with the best "
                "test-split accuracy / loss (the paper's SST-2 model is its best validation checkpoint)",
        key=KEYED_UNLESS_DEFAULT)

    def check(self, c: Checks) -> None:
        for name in ("epochs", "batch_size", "gradient_clip_val", "eval_every_epochs"):
            c.positive(name)

    @property
    def precision(self) -> str:
        return PRECISION[self.dtype]


# Trainer arguments that tda sets from its own settings (or fixes): passing them through would
# train a model that its run directory's key does not describe, or break the stage.
SET_BY_TDA = {"max_epochs": "train.epochs", "precision": "train.dtype", "gradient_clip_val": "train.gradient_clip_val",
              "check_val_every_n_epoch": "train.eval_every_epochs", "enable_progress_bar": "trainer.progress_bar",
              "logger": "logger=wandb|none", "deterministic": None, "enable_checkpointing": None,
              "default_root_dir": None}
TRAINER_ARGS = tuple(p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self")


@dataclass(frozen=True)
class TrainerSettings(Section):
    """`trainer`: tda's own keys (`progress_bar`, `attribution_device`) and the arguments of
    Lightning's `Trainer` for final training: `accelerator`, `devices`, `strategy` with tda's
    defaults, and any other (`+trainer.num_nodes=2`, `+trainer.fast_dev_run=1`) in `lightning`.
    Pass-through arguments that change what final training computes are part of the run
    directory's key (tda.runs.TRAINER_KEYS_OUTSIDE_RUN lists those that are not); further
    training reads only `accelerator` and `progress_bar`."""

    PATH = "trainer"
    accelerator: str = setting("cpu", "Lightning accelerator (final and further training): cpu | gpu | auto | ...")
    devices: int | str | list[int] = setting(1, "Lightning devices of final training: a count, -1 (all), auto, ids")
    strategy: str = setting("auto", "Lightning strategy of final training, e.g. ddp")
    progress_bar: bool = setting(True, "Lightning's bar in final training, tda's in further training")
    attribution_device: str = setting("cpu", "torch device the attribution methods run on: cpu | cuda | cuda:<i>")
    lightning: dict[str, Any] = setting({}, "any other `Trainer` argument, added with +trainer.<argument>=...")

    def check(self, c: Checks) -> None:
        devices = c.value("devices")
        if isinstance(devices, int) and not (devices == -1 or devices > 0):
            c.add(f"trainer.devices={devices!r} must be a positive count, -1 (all), 'auto' or a list of ids")
        for key in self.lightning:
            if key not in TRAINER_ARGS:
                c.add(unknown_key(f"trainer.{key}", TRAINER_OWN_KEYS + TRAINER_ARGS,
                                  "a tda setting or an argument of lightning.Trainer"))
            elif key in SET_BY_TDA:
                owner = SET_BY_TDA[key]
                c.add(f"trainer.{key} is set by tda" + (f" from {owner}; set {owner} instead" if owner else
                                                          "; remove the override"))

    @classmethod
    def load(cls, node: Any) -> tuple[Any, list[str]]:
        """Keys that are not tda's go to `lightning` (checked against Trainer's signature)."""
        values = to_container(node) if node is not None else {}
        if not isinstance(values, dict):
            return super().load(values)
        passed = {k: v for k, v in values.items() if k not in TRAINER_OWN_KEYS}
        return super().load({k: v for k, v in values.items() if k in TRAINER_OWN_KEYS} | {"lightning": passed})

    @property
    def dry_run(self) -> bool:
        """`fast_dev_run`: Lightning runs a few batches to find bugs; nothing is written."""
        return bool(self.lightning.get("fast_dev_run"))

    def trainer_args(self) -> dict[str, Any]:
        """Everything this section passes to `L.Trainer`."""
        return {"accelerator": self.accelerator, "devices": self.devices, "strategy": self.strategy,
                "enable_progress_bar": self.progress_bar} | self.lightning

    def require_devices(self, attribution: bool = False) -> None:
        """The devices asked for exist on this machine: `accelerator` (final and further
        training) and, with `attribution`, `attribution_device` (the methods). Cheap; called
        before any data is loaded."""
        problems = []
        accelerator = self.accelerator
        if accelerator.lower() in ("gpu", "cuda") and not torch.cuda.is_available():
            problems.append(f"trainer.accelerator={accelerator} asks for a CUDA GPU, but torch.cuda.is_available() is "
                            f"false on this machine (no GPU, or a CPU-only torch build); use trainer.accelerator=cpu "
                            f"(or auto), or run on a machine with a GPU")
        if attribution:
            device = self.attribution_device
            try:
                dev = torch.device(str(device))
            except (RuntimeError, ValueError):
                problems.append(f"trainer.attribution_device={device!r} is not a torch device; use cpu, cuda or "
                                f"cuda:<index>")
            else:
                if dev.type == "cuda" and not torch.cuda.is_available():
                    problems.append(f"trainer.attribution_device={device} asks for a CUDA GPU, but "
                                    f"torch.cuda.is_available() is false on this machine (no GPU, or a CPU-only torch "
                                    f"build); use trainer.attribution_device=cpu, or run on a machine with a GPU")
                elif dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
                    problems.append(f"trainer.attribution_device={device}: this machine has only "
                                    f"{torch.cuda.device_count()} CUDA device(s); use "
                                    f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
                elif dev.type == "mps" and not torch.backends.mps.is_available():
                    problems.append(f"trainer.attribution_device={device}: MPS is not available on this machine; "
                                    f"use cpu")
        if problems:
            raise ConfigError.listing("the configuration asks for devices this machine does not have", problems)


TRAINER_OWN_KEYS = tuple(f.name for f in fields(TrainerSettings) if f.name != "lightning")


def final_trainer(train: TrainSettings, trainer: TrainerSettings, logger: Any, root_dir: str,
                  callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """Lightning's `Trainer` for final training: deterministic, no Lightning checkpoints (tda
    writes the final model itself), the `trainer` section's arguments passed through."""
    return L.Trainer(**({"enable_model_summary": False, "num_sanity_val_steps": 0} | trainer.trainer_args()),
                     max_epochs=train.epochs, precision=train.precision, gradient_clip_val=train.gradient_clip_val,
                     check_val_every_n_epoch=train.eval_every_epochs, deterministic=True, logger=logger,
                     enable_checkpointing=False, default_root_dir=root_dir, callbacks=callbacks or [])



class BestCheckpoint(L.Callback):
    """`train.final_checkpoint=best_accuracy|best_loss`: keeps (in memory) the trainable weights of
    the evaluated epoch with the best test-split metric; :meth:`restore` puts them back after
    fit. The test split is the split the paper selects its SST-2 checkpoint on (GLUE's validation
    sentences). Ties keep the earlier epoch."""

    def __init__(self, rule: str):
        self.rule = rule
        self.metric, self.higher = {"best_accuracy": ("test/accuracy", True), "best_loss": ("test/loss", False)}[rule]
        self.best: tuple[int, float, dict[str, torch.Tensor]] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.metric])
        if self.best is None or (value > self.best[1] if self.higher else value < self.best[1]):
            state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
            self.best = (int(trainer.current_epoch) + 1, value, state)

    def restore(self, model: torch.nn.Module) -> dict[str, Any]:
        """Load the best weights into `model`; returns what to record (rule, epoch, metric value)."""
        if self.best is None:
            raise RuntimeError(f"train.final_checkpoint={self.rule}: no epoch was evaluated on the test split, so "
                               f"there is no best checkpoint; lower train.eval_every_epochs or use "
                               f"train.final_checkpoint=last")
        epoch, value, state = self.best
        model.load_state_dict(state)
        return {"rule": self.rule, "epoch": epoch, self.metric: value}


class FinalModelModule(L.LightningModule):
    """Mean per-example loss; only the model's trainable part is optimised."""

    def __init__(self, model: TDAModel, optimizer: Callable, task: str,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.task = task
        # augmentation of training batches (DataBundle.final_training_transform); never applied
        # to validation batches, and further training does not use this module at all
        self.transform = transform

    def forward(self, x):
        return self.model(x)

    def _step(self, batch, stage: str):
        x, y = batch
        out = self.model(x)
        loss = per_example_loss(out, y, self.task).mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, on_step=False, batch_size=len(x))
        if self.task == "classification":
            acc = (out.argmax(-1) == y).float().mean()
            self.log(f"{stage}/accuracy", acc, prog_bar=True, on_epoch=True, on_step=False, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx):
        if self.transform is not None:
            batch = (self.transform(batch[0]), batch[1])
        loss = self._step(batch, "train")
        if not bool(torch.isfinite(loss)):
            # raised here, it propagates out of trainer.fit: no final model is written
            raise DivergedError(
                f"final training diverged: the training loss is {float(loss.detach())} at epoch {self.current_epoch}, "
                f"step {self.global_step} (batch {batch_idx} of the epoch); nothing was written. Lower optimizer.lr "
                f"or set train.gradient_clip_val (e.g. 1.0), then re-run train.py")
        return loss

    def on_train_end(self):
        """The last optimizer step can still overflow after the last loss was checked."""
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise DivergedError(
                f"final training diverged: after the last step the weights {bad[:5]} hold NaN/inf; nothing was "
                f"written. Lower optimizer.lr or set train.gradient_clip_val (e.g. 1.0), then re-run train.py")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "test")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        # `model` is a TDAModel or, when a frozen part's features are cached, its trainable part;
        # frozen parameters have requires_grad=False either way (TDAModel.freeze_non_trainable)
        params = [p for p in self.model.parameters() if p.requires_grad]
        return self.optimizer_factory(params)


def loaders(x_train, y_train, x_test, y_test, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=max(batch_size, 512))
    return train, test


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str,
                   batch_size: int = 1024) -> dict[str, float]:
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, correct = [], 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size].to(device))
        yb = y[i:i + batch_size].to(device)
        losses.append(per_example_loss(out, yb, task).double().cpu())
        if task == "classification":
            correct += int((out.argmax(-1) == yb).sum())
    model.train(was)
    metrics = {"loss": float(torch.cat(losses).mean())}
    if task == "classification":
        metrics["accuracy"] = correct / len(x)
    return metrics
