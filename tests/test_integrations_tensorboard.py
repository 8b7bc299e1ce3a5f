"""`laperm train --tensorboard`: event files readable back with TensorBoard's EventAccumulator."""

import json
import subprocess
import sys

from conftest import run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TINY = [
    "--dataset",
    "synthetic",
    "--val-size",
    "64",
    "--batch-size",
    "64",
    "--threads",
    "1",
    "--no-progress",
    "--train-subset",
    "640",
    "--k",
    "3",
    "--eval-steps",
    "4",
]


def test_tensorboard_logs_epochs_step_evals_syncs_and_histograms(tmp_path, capsys, clean_engine_state):
    rc, out, err = run_cli(
        capsys, "train", *TINY, "--epochs", "2", "--out", str(tmp_path), "--name", "run", "--tensorboard"
    )
    assert rc == 0, err
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in (
        "epoch/train_loss",
        "epoch/test_acc",
        "epoch/val_acc",
        "epoch/lr",
        "epoch/reconnected",
        "epoch/k",
        "eval/test_acc",
        "sync/reconnected",
        "sync/lr",
    ):
        assert tag in tags["scalars"], tag
    epoch_ends = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = epoch_ends[-1]
    assert len(epoch_ends) == 2 and [e.step for e in events.Scalars("epoch/test_acc")] == epoch_ends
    # Step evaluations every 4 steps (except at an epoch's last step, which the epoch end evaluates).
    assert [e.step for e in events.Scalars("eval/test_acc")] == [s for s in range(4, last, 4) if s not in epoch_ends]
    syncs = events.Scalars("sync/reconnected")
    finals = [] if last % 3 == 0 else [last]  # every k=3 steps, and the final sync
    assert [e.step for e in syncs] == [*range(3, last + 1, 3), *finals]
    assert all(0 <= e.value <= 1 for e in syncs) and syncs[0].value > 0
    moved = [t for t in tags["histograms"] if t.startswith("moved/")]
    assert len(moved) >= 2  # one per permuted layer
    first = events.Histograms(moved[0])[0]
    assert first.step == 3 and first.histogram_value.num > 0


def test_tensorboard_flag_is_lazy_and_laperm_imports_no_integration():
    code = (
        "import sys, laperm, laperm.integrations, laperm.cli; "
        "print(sorted(m for m in ('pytorch_lightning', 'transformers', 'accelerate', 'tensorboard') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
