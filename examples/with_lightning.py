"""LaPerm with PyTorch Lightning: ``configure_optimizers`` returns LaPerm, a callback does the rest.

:class:`LaPermLightningCallback` validates at synced weights, puts the synced weights in each
checkpoint's ``state_dict`` (and the inner weights beside them, for an exact resume), and syncs and
verifies at the end of training.

    python examples/with_lightning.py
"""

from __future__ import annotations

import tempfile

import pytorch_lightning as pl
import torch
from torch import nn

from laperm import LaPerm, laperm_param_groups
from laperm.integrations import LaPermLightningCallback


class Classifier(pl.LightningModule):
    def __init__(self, k: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.k = k
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> dict:
        opt = LaPerm(torch.optim.Adam(laperm_param_groups(self), lr=1e-2), k=self.k)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


def loaders(seed: int = 0) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """A learnable synthetic task: 160 training points (10 batches), 64 for validation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(224, 8, generator=g)
    y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()
    ds = torch.utils.data.TensorDataset
    return (
        torch.utils.data.DataLoader(ds(x[:160], y[:160]), batch_size=16),
        torch.utils.data.DataLoader(ds(x[160:], y[160:]), batch_size=64),
    )


def trainer(epochs: int, callbacks: list[pl.Callback], root: str) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        deterministic=True,
    )


if __name__ == "__main__":
    model, laperm_callback = Classifier(), LaPermLightningCallback()
    with tempfile.TemporaryDirectory() as root:
        fit = trainer(4, [laperm_callback], root)
        fit.fit(model, *loaders())
        acc = fit.validate(model, loaders()[1], verbose=False)[0]["val_acc"]
    print(f"validation accuracy {acc:.1%}; weights synced and verified as row-wise permutations of their θ0")
