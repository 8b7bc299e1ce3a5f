"""The Hugging Face Trainer with LaPerm and LaPermTrainerCallback (a tiny random BERT; nothing downloaded)."""

import os
import runpy
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from laperm.integrations import find_laperm  # noqa: E402
from laperm.reconnect import is_row_permutation  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "with_hf_trainer.py"


def _permuted_names(trainer) -> list[str]:
    return [name for name, p in trainer.model.named_parameters() if p.dim() >= 2]


def test_hf_trainer_evaluates_and_saves_synced_weights_and_ends_verified(tmp_path):
    example = runpy.run_path(str(EXAMPLE))  # (not as __main__: its functions only)
    model = example["tiny_bert"]()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[bool] = []

    def compute_metrics(pred):
        # Evaluations come at steps 5, 10, ... and k=3: between syncs, so only the callback makes this true.
        seen.append(all(is_row_permutation(p, theta0[n]) for n, p in model.named_parameters() if p.dim() >= 2))
        return example["accuracy"](pred)

    trainer, callback = example["train"](str(tmp_path / "a"), model=model, compute_metrics=compute_metrics)
    assert len(seen) >= 4 and all(seen)
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    names = _permuted_names(trainer)
    assert all(is_row_permutation(final[n], theta0[n]) for n in names)
    assert any(not torch.equal(final[n], theta0[n]) for n in names)  # it did reconnect
    find_laperm(trainer.optimizer).verify()
    moved = [r["eval_laperm_reconnected"] for r in trainer.state.log_history if "eval_laperm_reconnected" in r]
    assert moved and 0 < max(moved) <= 1
    saved = load_file(str(tmp_path / "a" / "checkpoint-5" / "model.safetensors"))  # saved between syncs (k=3)
    assert all(is_row_permutation(saved[n], theta0[n]) for n in names if n in saved)
    assert sum(n in saved for n in names) >= 4

    # Evaluating and saving left the trajectory alone: the same run without them ends bit-identical.
    plain, _ = example["train"](str(tmp_path / "b"), eval_steps=None, save_steps=None)
    for n, p in plain.model.named_parameters():
        assert torch.equal(p, final[n]), n


def test_hf_trainer_callback_needs_a_laperm_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from laperm.integrations import LaPermTrainerCallback

    example = runpy.run_path(str(EXAMPLE))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = Trainer(
        model=example["tiny_bert"](),
        args=args,
        train_dataset=example["TokenTask"](16, seed=0),
        callbacks=[LaPermTrainerCallback()],
    )
    try:
        trainer.train()
    except TypeError as e:
        assert "optimizers=(LaPerm" in str(e)
    else:
        raise AssertionError("training without LaPerm should have failed")
