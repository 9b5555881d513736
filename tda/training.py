"""Final-model training with Lightning: the model the whole study starts from (θᶠ)."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tda.models.base import TDAModel, per_example_loss


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
            raise FloatingPointError(
                f"final training diverged: the training loss is {float(loss.detach())} at epoch {self.current_epoch}, "
                f"step {self.global_step} (batch {batch_idx} of the epoch); nothing was written. Lower optimizer.lr "
                f"or set train.gradient_clip_val (e.g. 1.0), then re-run train.py")
        return loss

    def on_train_end(self):
        """The last optimizer step can still overflow after the last loss was checked."""
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(
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
