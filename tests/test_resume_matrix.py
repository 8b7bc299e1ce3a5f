"""Resume is exact wherever LaPerm trains (issue 24): every tool crossed with both sync rules, plain Adam the control.

Each cell trains 50 steps straight, and again with a stop between two syncs (k = 7; the checkpoint is
taken at step 20 or 30, neither a multiple of 7) saved as that tool saves, then resumes fresh objects
from the checkpoint to step 50.  Final weights and optimizer state must be bit-identical: the same
computation on the same machine in the same process, so exact is what to expect.  Where a tool saves
the model at synced weights (the callbacks, ``synced_weights()`` around a save), only the inner
weights the optimizer's state carries make that possible.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import run_cli  # noqa: E402
from torch import nn  # noqa: E402

from laperm import LaPerm, laperm_param_groups  # noqa: E402
from laperm.integrations import find_laperm  # noqa: E402
from laperm.optim_state import INNER, INNER_COUNT  # noqa: E402
from laperm.reconnect import is_row_permutation  # noqa: E402

RULES = ("overwrite", "latent", "adam")  # "adam": plain Adam in the same harness, the control
K, STOP, STEPS, BATCH = 7, 30, 50, 16

warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # (DCP in one process)


class Net(nn.Module):
    """A tiny MLP; with ``labels`` it returns what a Hugging Face Trainer wants (loss and logits)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.body(x)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def build(rule: str, width: int = 8) -> tuple[Net, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = Net(width)
    if rule == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-2), k=K, sync_rule=rule)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.98**s)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        model(x, y)["loss"].backward()
        opt.step()
        sched.step()


def synced(opt: Any) -> Any:
    """LaPerm's temporary sync (what the callbacks save inside), nothing for plain Adam."""
    laperm = find_laperm(opt)
    return laperm.synced_weights() if laperm is not None else _nothing()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def identical(a: Any, b: Any, where: str = "") -> None:
    """Assert ``a`` and ``b`` (nested dicts, lists, tensors, numbers) are bit-identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bytes(a), _bytes(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def outcome(model: nn.Module, opt: Any) -> dict[str, Any]:
    return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()}, "optim": opt.state_dict()}


def check_cell(full: dict[str, Any], resumed: dict[str, Any], rule: str) -> None:
    identical(full, resumed)
    moved = any(not torch.equal(full["weights"][k], build(rule)[0].state_dict()[k]) for k in full["weights"])
    assert moved  # (it trained)


# -- own loop: torch.save inside synced_weights() -------------------------------------------------------


def own_loop(rule: str, tmp: Path, stop: bool) -> dict[str, Any]:
    model, opt, sched = build(rule)
    if not stop:
        train(model, opt, sched, range(STEPS))
        return outcome(model, opt)
    train(model, opt, sched, range(STOP))
    with synced(opt):  # the model file is a permutation of θ0
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}, tmp / "c.pt")
    model, opt, sched = build(rule)  # fresh objects
    saved = torch.load(tmp / "c.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    sched.load_state_dict(saved["sched"])
    train(model, opt, sched, range(STOP, STEPS))
    return outcome(model, opt)


# -- DCP: get_state_dict / dcp.save / dcp.load / set_state_dict ----------------------------------------


def dcp_loop(rule: str, tmp: Path, stop: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, sched = build(rule)
    if not stop:
        train(model, opt, sched, range(STEPS))
        return outcome(model, opt)
    train(model, opt, sched, range(STOP))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "sched": sched.state_dict()}, checkpoint_id=tmp / "dcp")
    model, opt, sched = build(rule)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd, "sched": sched.state_dict()}
    dcp.load(state, checkpoint_id=tmp / "dcp")
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(state["sched"])
    train(model, opt, sched, range(STOP, STEPS))
    return outcome(model, opt)


# -- accelerate: save_state / load_state (inside synced_weights(), so the model file is synced) ---------


def accelerate_loop(rule: str, tmp: Path, stop: bool) -> dict[str, Any]:
    from accelerate import Accelerator

    def prepared() -> tuple[Any, Any, Any, Any]:
        accelerator = Accelerator(cpu=True)
        model, opt, sched = build(rule)
        return accelerator, *accelerator.prepare(model, opt, sched)

    accelerator, model, opt, sched = prepared()
    if not stop:
        train(model, opt, sched, range(STEPS))
        return outcome(model, find_laperm(opt) or opt.optimizer)
    train(model, opt, sched, range(STOP))
    with synced(opt):
        accelerator.save_state(str(tmp / "acc"))
    accelerator, model, opt, sched = prepared()
    accelerator.load_state(str(tmp / "acc"))
    train(model, opt, sched, range(STOP, STEPS))
    return outcome(model, find_laperm(opt) or opt.optimizer)


SIMPLE = {"own loop": own_loop, "DCP": dcp_loop, "accelerate": accelerate_loop}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tool", list(SIMPLE))
def test_resume_is_bit_identical(tool, rule, tmp_path):
    run = SIMPLE[tool]
    check_cell(run(rule, tmp_path, stop=False), run(rule, tmp_path, stop=True), rule)


# -- Lightning: ModelCheckpoint at step 20, stop at 30, resume with ckpt_path ---------------------------


def lightning_run(rule: str, root: Path, epochs: int, ckpt: Path | None = None) -> dict[str, Any]:
    import pytorch_lightning as pl

    from laperm.integrations import LaPermLightningCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.opt, self.sched = build(rule)

        def training_step(self, b: Any, i: int) -> torch.Tensor:
            return self.net(*b)["loss"]

        def configure_optimizers(self) -> Any:
            return {"optimizer": self.opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}

    data = [batch(step) for step in range(10)]  # 10 steps an epoch: step 20 ends epoch 2
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    saving = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
    callbacks = [saving] if rule == "adam" else [LaPermLightningCallback(), saving]
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=str(root),
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Module()
    trainer.fit(module, loader, ckpt_path=str(ckpt) if ckpt else None)
    return outcome(module.net, module.opt)


# -- Hugging Face Trainer: save_steps=20, stop after 30, resume_from_checkpoint=checkpoint-20 ---------


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = (torch.cat(t) for t in zip(*(batch(s) for s in range(10)), strict=True))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def hf_run(rule: str, out: Path, stop_at: int | None = None, resume: Path | None = None) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from laperm.integrations import LaPermTrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            control.should_training_stop = state.global_step == stop_at

    model, opt, sched = build(rule)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        save_steps=20,
        per_device_train_batch_size=BATCH,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    callbacks = [Stop()] + ([] if rule == "adam" else [LaPermTrainerCallback()])
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(opt, sched), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return outcome(model, opt)


FRAMEWORKS = ("Lightning", "HF Trainer")


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tool", FRAMEWORKS)
def test_framework_resume_is_bit_identical(tool, rule, tmp_path):
    if tool == "Lightning":
        full = lightning_run(rule, tmp_path / "full", epochs=5)
        lightning_run(rule, tmp_path / "half", epochs=3)  # stops at step 30
        resumed = lightning_run(rule, tmp_path / "resumed", 5, tmp_path / "half" / "ckpt" / "epoch=1-step=20.ckpt")
    else:  # the case: checkpoint-20 of a 50-step run, stopped after step 30
        full = hf_run(rule, tmp_path / "full")
        hf_run(rule, tmp_path / "half", stop_at=STOP)
        resumed = hf_run(rule, tmp_path / "resumed", resume=tmp_path / "half" / "checkpoint-20")
        if rule != "adam":
            from safetensors.torch import load_file

            saved = load_file(str(tmp_path / "half" / "checkpoint-20" / "model.safetensors"))
            theta0 = build(rule)[0].state_dict()
            assert all(is_row_permutation(saved[n], theta0[n]) for n in saved if saved[n].dim() >= 2)
    check_cell(full, resumed, rule)


# -- laperm train: SIGTERM at step 30 (a checkpoint between syncs), then --resume ----------------------

TRAIN_ARGS = ["--model", "f2", "--dataset", "synthetic", "--val-size", "64", "--epochs", "4", "--k", str(K)]
TRAIN_ARGS += ["--batch-size", "32", "--threads", "1", "--no-progress"]


@pytest.mark.slow
@pytest.mark.usefixtures("clean_engine_state")
@pytest.mark.parametrize("rule", RULES)
def test_laperm_train_resume_is_bit_identical(rule, tmp_path, capsys, monkeypatch):
    from laperm import checkpoint
    from laperm.engine.checkpointing import Key

    flags = ["--optimizer", "adam"] if rule == "adam" else ["--sync-rule", rule]
    for name in ("full", "stopped"):
        if name == "stopped":
            monkeypatch.setenv(checkpoint.FAULT_ENV, f"term@step:{STOP}")
        rc, _, err = run_cli(capsys, "train", *TRAIN_ARGS, *flags, "--out", str(tmp_path), "--name", name)
        assert rc == (3 if name == "stopped" else 0), err
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    assert run_cli(capsys, "train", "--resume", str(tmp_path / "stopped"))[0] == 0

    def final(run: Path) -> dict[str, Any]:
        last = checkpoint.load(checkpoint.list_checkpoints(run / "checkpoints")[0])
        return {"weights": checkpoint.load(run / "final.pt")["model"], "optim": last[Key.OPTIMIZER]}

    identical(final(tmp_path / "full"), final(tmp_path / "stopped"))


# -- what a checkpoint taken at synced weights costs ---------------------------------------------------


def _saved(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


@pytest.mark.parametrize("rule", ("overwrite", "latent"))
def test_checkpoint_grows_by_the_inner_permuted_weights_only_at_synced_weights(rule):
    model, opt, sched = build(rule, width=64)
    laperm = find_laperm(opt)
    permuted = {id(p) for _, p in laperm.permuted_parameters()}
    train(model, opt, sched, range(4 * K))  # right after a sync: synced_weights() has nothing to set aside
    with opt.synced_weights():
        assert all(INNER not in st for st in opt.state_dict()["state"].values())
    train(model, opt, sched, range(4 * K, STOP))
    plain = {"model": model.state_dict(), "optim": opt.state_dict()}
    with opt.synced_weights():
        at_synced = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optim": opt.state_dict()}
    plain["model"] = {k: v.clone() for k, v in plain["model"].items()}  # (a dict like at_synced's, same pickle)
    params = [p for g in opt.param_groups for p in g["params"]]
    carried = {i: st[INNER] for i, st in at_synced["optim"]["state"].items() if INNER in st}
    assert all(INNER not in st for st in plain["optim"]["state"].values())
    if rule == "latent":  # the inner weights are the latent weights, saved always
        assert not carried and _saved(at_synced) == _saved(plain)
        return
    assert {id(params[i]) for i in carried} == permuted  # every permuted tensor differs from its synced weights
    assert [g[INNER_COUNT] for g in at_synced["optim"]["param_groups"]] == [
        sum(i in carried for i in g["params"]) for g in at_synced["optim"]["param_groups"]
    ]
    for i, z in carried.items():
        assert torch.equal(z, params[i])  # the inner weights, now back in place
    inner_bytes = sum(z.numel() * z.element_size() for z in carried.values())
    assert inner_bytes == sum(p.numel() * p.element_size() for _, p in laperm.permuted_parameters())
    # Beyond the tensors' bytes, torch.save adds a zip record and a pickle entry per tensor (< 512 bytes).
    growth = _saved(at_synced) - _saved(plain)
    assert inner_bytes <= growth <= inner_bytes + 512 * len(carried)


def test_a_dcp_checkpoint_taken_inside_synced_weights_warns_that_resume_is_not_exact(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, sched = build("overwrite")
    train(model, opt, sched, range(STOP))
    with opt.synced_weights():
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "dcp")
    model, opt, sched = build("overwrite")
    model_sd, optim_sd = get_state_dict(model, opt)  # a fresh template: no slots for the inner weights
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "dcp")
    with pytest.warns(UserWarning, match="save DCP checkpoints outside synced_weights"):
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)


def test_an_optimizer_loaded_before_its_model_warns_and_leaves_the_model_alone(tmp_path):
    model, opt, sched = build("overwrite")
    train(model, opt, sched, range(STOP))
    with opt.synced_weights():
        saved = opt.state_dict()
    model, opt, sched = build("overwrite")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="load the model's weights from the same checkpoint before"):
        opt.load_state_dict(saved)
    identical(before, model.state_dict())
