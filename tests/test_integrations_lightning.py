"""PyTorch Lightning with LaPerm and LaPermLightningCallback: fit, checkpoint mid-training, resume exactly."""

import runpy
from pathlib import Path

import pytorch_lightning as pl
import torch

from laperm.integrations import LaPermLightningCallback
from laperm.integrations.lightning import INNER_KEY
from laperm.optim_state import INNER
from laperm.reconnect import is_row_permutation

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "with_lightning.py"


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lightning_checkpoint_resume_is_bit_identical_and_verified(tmp_path):
    ex = runpy.run_path(str(EXAMPLE))
    Classifier, loaders, trainer = ex["Classifier"], ex["loaders"], ex["trainer"]
    theta0 = _weights(Classifier())
    permuted = [n for n, t in theta0.items() if t.dim() >= 2]

    # Uninterrupted: 4 epochs of 10 steps; k=3, so epoch ends (steps 10, 20, 30) fall between syncs.
    full, cb = Classifier(), LaPermLightningCallback()
    trainer(4, [cb], str(tmp_path / "full")).fit(full, *loaders())
    expected = _weights(full)
    assert all(is_row_permutation(expected[n], theta0[n]) for n in permuted)
    assert any(not torch.equal(expected[n], theta0[n]) for n in permuted)
    assert cb.reconnected is not None

    # Interrupted after 2 epochs (the checkpoint is written at step 20, between syncs), then resumed.
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=-1)
    trainer(2, [LaPermLightningCallback(), ckpt_cb], str(tmp_path / "half")).fit(Classifier(), *loaders())
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    # The checkpoint's model is the synced one (a permutation of θ0); LaPerm's state carries the inner weights
    # of the permuted tensors (and nothing else: no second copy of the model).
    sd = saved["state_dict"]
    assert all(is_row_permutation(sd[n], theta0[n]) for n in permuted)
    assert INNER_KEY not in saved
    inner = [st[INNER] for st in saved["optimizer_states"][0]["state"].values() if INNER in st]
    assert len(inner) == len(permuted) and not any(is_row_permutation(z, theta0[n]) for z, n in zip(inner, permuted))

    resumed, cb2 = Classifier(), LaPermLightningCallback()
    fit = trainer(4, [cb2], str(tmp_path / "resumed"))
    fit.fit(resumed, *loaders(), ckpt_path=str(ckpt))
    for n, t in _weights(resumed).items():
        assert torch.equal(t, expected[n]), n
    cb2.laperm(fit).verify()

    # What load_from_checkpoint gives is the synced model of step 20.
    loaded = Classifier.load_from_checkpoint(str(ckpt))
    assert all(is_row_permutation(p, theta0[n]) for n, p in loaded.named_parameters() if n in permuted)


def test_lightning_validates_at_synced_weights(tmp_path):
    ex = runpy.run_path(str(EXAMPLE))
    theta0 = _weights(ex["Classifier"]())
    seen: list[bool] = []

    class Probe(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.append(all(is_row_permutation(p, theta0[n]) for n, p in pl_module.named_parameters() if p.dim() >= 2))

    model, cb = ex["Classifier"](), LaPermLightningCallback()
    fit = ex["trainer"](2, [cb, Probe()], str(tmp_path))
    fit.fit(model, *ex["loaders"]())
    assert seen == [True, True]  # (after steps 10 and 20, neither a multiple of k=3)
    assert 0 < float(fit.callback_metrics["laperm/reconnected"]) <= 1  # logged at the second validation


def test_a_checkpoint_of_an_earlier_version_resumes_from_its_inner_model():
    """Earlier versions kept the whole inner model under INNER_KEY; loading one puts it in place."""
    module, inner = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert not torch.equal(module.weight, inner.weight)
    LaPermLightningCallback().on_load_checkpoint(None, module, {INNER_KEY: inner.state_dict()})
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), inner.parameters(), strict=True))
