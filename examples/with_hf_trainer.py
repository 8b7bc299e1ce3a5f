"""LaPerm with the Hugging Face ``Trainer``: a tiny BERT classifier, randomly initialised (nothing downloaded).

The Trainer gets ``optimizers=(LaPerm(...), scheduler)`` and :class:`LaPermTrainerCallback`, which
evaluates and saves at synced weights and syncs at the end; every trained weight row is then a
permutation of its initial values.

    HF_HUB_OFFLINE=1 python examples/with_hf_trainer.py
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, EvalPrediction, Trainer, TrainingArguments

from laperm import LaPerm, laperm_param_groups
from laperm.integrations import LaPermTrainerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TokenTask(torch.utils.data.Dataset):
    """Random token sequences; the label says whether the first token is in the lower half of the vocabulary."""

    def __init__(self, n: int, seed: int, vocab: int = 32, length: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] < vocab // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert(seed: int = 0) -> nn.Module:
    config = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def train(
    output_dir: str,
    model: nn.Module | None = None,
    epochs: int = 3,
    k: int = 3,
    eval_steps: int | None = 5,
    save_steps: int | None = 5,
    compute_metrics: Any = accuracy,
) -> tuple[Trainer, LaPermTrainerCallback]:
    """Train the tiny BERT with LaPerm(AdamW); evaluate and save every few steps (None: never)."""
    model = tiny_bert() if model is None else model
    opt = LaPerm(torch.optim.AdamW(laperm_param_groups(model), lr=1e-2), k=k)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-2,
        seed=0,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_steps=5,
        dataloader_num_workers=0,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps,
    )
    callback = LaPermTrainerCallback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenTask(192, seed=1),
        eval_dataset=TokenTask(128, seed=2),
        optimizers=(opt, scheduler),
        callbacks=[callback],
        compute_metrics=compute_metrics,
    )
    trainer.train()
    return trainer, callback


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as out:
        trainer, callback = train(out)
        metrics = trainer.evaluate()  # after training: the weights are synced for good
    moved = [r["eval_laperm_reconnected"] for r in trainer.state.log_history if "eval_laperm_reconnected" in r]
    print(
        f"accuracy {metrics['eval_accuracy']:.1%}; between evaluations {min(moved):.1%} to {max(moved):.1%} "
        "of the permuted weights reconnected; every weight row verified as a permutation of its θ0"
    )
