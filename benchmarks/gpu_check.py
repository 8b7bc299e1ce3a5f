"""Does the GPU fast path work?  Every image model, fast against eager, each row in its own process.

``scripts/gpu_check.sh`` runs this after the CUDA-only tests (``python -m benchmarks.gpu_check --help``).
A row is one model x precision (fp32, bf16) x optimizer (LaPerm(Adam), Adam), for every model of the
registry that ``--mode fast`` accepts (:func:`fast_models`).  Its process trains the model twice from
the same initial weights on the same batches (same data, seed and order; the preset's augmentation):

* **eager** -- :class:`~laperm.fast.step.DeviceStep` without a CUDA graph, contiguous layout;
* **fast** -- what ``laperm train --mode fast --channels-last`` runs: the step captured as a CUDA graph
  and replayed, channels_last for convnets (on CPU there is no graph: the same eager step).

Both use the same inner Adam (fused and capturable on CUDA), so what differs is the graph and the
memory layout.  LaPerm syncs every ``min(k, SYNC_EVERY)`` steps, so the 60 steps include syncs
writing the weights in place under the graph.  The data is :func:`laperm.data.synthetic_dataset`
(class prototypes plus noise: learnable in a few dozen steps, so a fast step that does not train
would be far from eager's loss).

Besides these ``plain`` rows, three kinds of row on the first model checked, LaPerm fp32 (:data:`KINDS`):

* ``lr-schedule`` -- the learning rate changes during the run (x0.3 at a third, again at two thirds of
  the steps), as a scheduler assigns it: the graph must read each new value;
* ``odd-last-batch`` -- the data ends in a short batch of odd size (``drop_last=False``): the graph path
  computes it eagerly, with the captured step's state;
* ``stack4`` -- four nets trained as one stack (:class:`~laperm.engine.stack_step.StackStep`, vectorised,
  captured on CUDA), each LaPerm member's sync through ``LaPerm.sync_together``; losses per member.

Each row records whether the graph was captured (and any warning, e.g. a fallback to eager), the loss
of every step of both runs and their largest difference, the final loss of both (mean over the last
``steps // 6`` steps), whether every step and the final loss agree within :data:`TOLERANCE`, images/s
of both, and the full traceback when the process failed.  Rows run ``--jobs`` processes at
a time, but their training holds a lock: only one row uses the device at once (process starts
overlap), so images/s is not shared with another row; it is still only indicative (a few dozen
steps, a sync every 20); ``python -m benchmarks --device cuda`` measures throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import inspect
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from laperm import models
from laperm.config import PRESETS, resolve_config
from laperm.data import synthetic_dataset
from laperm.data.augment import make_augment
from laperm.data.device import DeviceBatches
from laperm.engine.stack_step import StackStep
from laperm.fast.step import DeviceStep, make_adam
from laperm.models.stacked import LossSpec, StackedModel
from laperm.optim import LaPerm, laperm_param_groups

from . import isolate
from .common import md_table

PRECISIONS, OPTIMIZERS = ("fp32", "bf16"), ("laperm", "adam")
STEPS, SYNC_EVERY = 60, 20
QUICK = {"models": ("conv7",), "steps": 6, "batch": 8}  # conv7: convs, dropout, augmentation
# |loss_fast - loss_eager| <= rtol * |loss_eager| + atol, on the mean loss of the last steps.  Not
# bit-identity: on CUDA the graph and channels_last run other cuDNN kernels (autotuned, summing in
# other orders), and 60 Adam steps carry those float32 rounding differences on (Adam normalises the
# gradient, so a near-zero component's sign can change a step by a whole lr); in bf16 the autocast
# forward rounds to 8 mantissa bits (relative 4e-3 per op), hence a looser bound.  The data is
# learnable, so a step that does not train stays near its first loss, which the row records next to
# eager's final one.  Chosen bounds, to tighten from the recorded differences once measured on a GPU;
# on CPU both runs compute the same thing, and the difference is exactly 0.
TOLERANCE = {"fp32": (0.05, 0.02), "bf16": (0.10, 0.05)}  # precision: (rtol, atol)
ROW_TIMEOUT_S = 150.0
KINDS = ("plain", "lr-schedule", "odd-last-batch", "stack4")  # the extra kinds: LaPerm fp32, first model
STACK = 4  # members of the stack4 row


def fast_models() -> list[str]:
    """The registry's image models that ``--mode fast`` trains: not text, buildable from the name alone
    (``resnet`` needs ``depth=``, which a config cannot pass)."""
    out = []
    for name, spec in models.MODELS.items():
        params = inspect.signature(spec.builder).parameters.values()
        needs = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if spec.dataset != "text" and not needs:
            out.append(name)
    return out


def _config(name: str) -> Any:
    return resolve_config({"preset": name} if name in PRESETS else {"model": name})


def _has_conv(model: torch.nn.Module) -> bool:
    return any(p.dim() == 4 for p in model.parameters())


# -- one row (in its own process) -------------------------------------------------------------------------


def check_row(
    name: str,
    optimizer: str,
    precision: str,
    device: torch.device,
    steps: int,
    batch: int,
    lock: Path | None,
    kind: str = "plain",
) -> dict[str, Any]:
    """Eager, then fast, on the same batches: the row (``error`` None; the parent fills failures)."""
    spec = models.get_spec(name)
    short = (batch // 2) | 1 if kind == "odd-last-batch" else batch  # the last batch's size (odd)
    n = (steps - 1) * batch + short
    data = synthetic_dataset(n_train=n * (STACK if kind == "stack4" else 1), n_test=1, shape=spec.input_shape,
                             num_classes=spec.num_classes)  # fmt: skip
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, before the lock: process starts may overlap
    train = _train_stack if kind == "stack4" else _train
    with _device_lock(lock):
        eager = train(name, optimizer, precision, device, False, data, steps, batch, kind)
        fast = train(name, optimizer, precision, device, True, data, steps, batch, kind)
    rtol, atol = TOLERANCE[precision]
    diff = abs(fast["final_loss"] - eager["final_loss"])
    within = math.isfinite(diff) and diff <= rtol * abs(eager["final_loss"]) + atol
    step_diffs = [
        (abs(f - e), abs(f - e) <= rtol * abs(e) + atol)
        for fs, es in zip(fast["step_losses"], eager["step_losses"], strict=True)
        for f, e in zip(fs, es, strict=True)
    ]
    worst = max(range(len(step_diffs)), key=lambda i: step_diffs[i][0])
    steps_within = all(ok and math.isfinite(d) for d, ok in step_diffs)
    captured = fast["captured"]
    return {
        **_ident(name, optimizer, precision, batch, steps, kind),
        "last_batch": short,
        "device": str(device),
        "k": fast["k"],
        "graph": fast["graph"],
        "captured": captured,
        "capture_error": fast["capture_error"],
        "warnings": fast["warnings"],
        "loss_eager_first": eager["first_loss"],
        "loss_eager": eager["final_loss"],
        "loss_fast": fast["final_loss"],
        "loss_diff": diff,
        "step_losses_eager": eager["step_losses"],  # [step][member] (one member unless stack4)
        "step_losses_fast": fast["step_losses"],
        "step_diff_max": step_diffs[worst][0],
        "step_diff_max_at": worst // len(fast["step_losses"][0]) + 1,
        "steps_within_tolerance": steps_within,
        "tolerance": {"rtol": rtol, "atol": atol},
        "within_tolerance": within,
        "images_per_s_fast": fast["images_per_s"],
        "images_per_s_eager": eager["images_per_s"],
        "ok": within and steps_within and (captured is True or device.type != "cuda"),
        "error": None,
    }


def _ident(name: str, optimizer: str, precision: str, batch: int, steps: int, kind: str) -> dict[str, Any]:
    return {"model": name, "kind": kind, "optimizer": optimizer, "precision": precision, "batch": batch, "steps": steps}


@contextlib.contextmanager
def _device_lock(path: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (rows running at once take turns on the device)."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(
    name: str,
    optimizer: str,
    precision: str,
    device: torch.device,
    fast: bool,
    data: Any,
    batch: int,
    steps: int,
    kind: str = "plain",
) -> tuple[DeviceStep, DeviceBatches, int | None]:
    """Model (seed 0), optimizer, step and batches as ``laperm train`` builds them for this mode."""
    cfg, spec = _config(name), models.get_spec(name)
    torch.manual_seed(0)  # dropout draws from the global generators: the same masks for eager and fast
    model = models.build(name, seed=0).to(device)
    model.train()
    channels_last = fast and device.type == "cuda" and _has_conv(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # before the optimizer
    inner = make_adam(laperm_param_groups(model), lr=cfg.lr, eps=cfg.adam_eps, device=device)
    k = min(cfg.k, SYNC_EVERY, max(1, steps // 3)) if optimizer == "laperm" else None  # syncs within the run
    opt = LaPerm(inner, k=k) if k is not None else inner
    l2_params = model.l2_parameters() if spec.l2 else []  # type: ignore[operator]
    step = DeviceStep(
        model,
        opt,
        l2=spec.l2,
        l2_params=l2_params,
        loss_scale=cfg.loss_scale,
        precision=precision,
        channels_last=channels_last,
        graph=fast and device.type == "cuda",
    )
    augment = make_augment(cfg.augment) if cfg.augment else None
    batches = DeviceBatches(
        data.train_x,
        data.train_y,
        batch,
        seed=0,  # the same batches for eager and fast: same order, same augmentation draws
        device=device,
        mean=data.mean,
        std=data.std,
        augment=augment,
        channels_last=channels_last,
        drop_last=kind != "odd-last-batch",
    )
    return step, batches, k


def _train(
    name: str,
    optimizer: str,
    precision: str,
    device: torch.device,
    fast: bool,
    data: Any,
    steps: int,
    batch: int,
    kind: str = "plain",
) -> dict[str, Any]:
    """``steps`` steps (one epoch of the data): every step's loss, images/s of the middle steps."""
    step, batches, k = _build(name, optimizer, precision, device, fast, data, batch, steps, kind)
    schedule = _lr_schedule(step.inner, steps) if kind == "lr-schedule" else None
    out = _timed_steps(step, iter(batches), steps, device, schedule)
    return {**out, "k": k, **_capture_state(step)}


def _lr_schedule(inner: torch.optim.Optimizer, steps: int) -> Any:
    """Before step ``i``: each group's lr x0.3 at a third and at two thirds of the steps (floats, as a scheduler sets)."""
    base = [float(g["lr"]) for g in inner.param_groups]

    def apply(i: int) -> None:
        for group, lr in zip(inner.param_groups, base, strict=True):
            group["lr"] = lr * 0.3 ** (3 * i // steps)

    return apply


def _timed_steps(step: Any, batches: Iterator[Any], steps: int, device: torch.device, schedule: Any) -> dict[str, Any]:
    """Run ``steps`` steps; the loss of each (from the step's device totals, read once at the end: no host
    sync in between), first and final mean loss, images/s from after the capture to the last steps."""
    first_n, last_n = max(1, steps // 12), max(1, steps // 6)
    timed_from = max(first_n, steps // 6)  # after warm-up and capture
    totals, sizes = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(1, steps + 1):
            if schedule is not None:
                schedule(i - 1)
            x, y = next(batches)
            step(x, y)
            totals.append(step.loss_sum.clone())  # (running sums: a graph adds to them in place)
            sizes.append(y.shape[-1])
            if i == timed_from:
                _sync(device)
                start = time.perf_counter()
            if i == steps - last_n:
                _sync(device)
                elapsed = time.perf_counter() - start
    sums = torch.stack(totals).reshape(steps, -1).tolist()
    losses = [[(b - a) / n for a, b in zip([0.0] * len(sums[0]) if i == 0 else sums[i - 1], sums[i])]
              for i, n in enumerate(sizes)]  # fmt: skip
    timed = steps - last_n - timed_from
    return {
        "step_losses": losses,
        "first_loss": sum(sum(r) / len(r) for r in losses[:first_n]) / first_n,
        "final_loss": sum(sum(r) / len(r) for r in losses[-last_n:]) / last_n,
        "images_per_s": timed * sizes[0] * len(losses[0]) / elapsed if timed > 0 and elapsed > 0 else float("nan"),
        "warnings": sorted({f"{w.category.__name__}: {w.message}"[:2000] for w in caught}),
    }


def _train_stack(
    name: str,
    optimizer: str,
    precision: str,
    device: torch.device,
    fast: bool,
    data: Any,
    steps: int,
    batch: int,
    kind: str = "stack4",
) -> dict[str, Any]:
    """:data:`STACK` nets of ``name`` (seeds 0..) as one stack, each on its own share of the data; fast: the
    vectorised step captured on CUDA. Each member's LaPerm syncs through ``LaPerm.sync_together``."""
    cfg = _config(name)
    torch.manual_seed(0)
    nets = [models.build(name, seed=s).to(device) for s in range(STACK)]
    stack = StackedModel(nets)
    inner = make_adam(stack.parameters(), lr=cfg.lr, eps=cfg.adam_eps, device=device)
    k = min(cfg.k, SYNC_EVERY, max(1, steps // 3))
    # each member's LaPerm: its count and sync of its rows (its own parameters get no gradient)
    laperms = [LaPerm(make_adam(laperm_param_groups(m), lr=cfg.lr, eps=cfg.adam_eps, device=device), k=k) for m in nets]
    totals = (
        torch.zeros(STACK, dtype=torch.float64, device=device),
        torch.zeros(STACK, dtype=torch.int64, device=device),
    )
    loss = LossSpec(sum_scale=cfg.loss_scale == "sum", precision=precision, foreach_l2=True)
    graphed = StackStep(stack, inner, loss, totals, vectorize=True, graph=fast and device.type == "cuda")
    n = len(data.train_x) // STACK
    shares = [
        iter(DeviceBatches(data.train_x[i * n : (i + 1) * n], data.train_y[i * n : (i + 1) * n], batch, seed=i,
                           device=device, mean=data.mean, std=data.std))
        for i in range(STACK)
    ]  # fmt: skip

    class Step:  # the stacked step, then the members' syncs, with DeviceStep's loss_sum
        loss_sum, inner = totals[0], graphed.inner

        def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            graphed(x, y)
            LaPerm.sync_together(laperms)

    def batches() -> Iterator[Any]:
        while True:
            pairs = [next(b) for b in shares]
            yield stack.stack_inputs([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    out = _timed_steps(Step(), batches(), steps, device, None)
    return {**out, "k": k, **_capture_state(graphed)}


def _capture_state(step: Any) -> dict[str, Any]:
    """Whether the step ran from a captured CUDA graph (``DeviceStep.captured``), and the capture error if it fell back."""
    if not step.use_graph:
        return {"graph": False, "captured": None, "capture_error": None}
    return {"graph": True, "captured": step.captured, "capture_error": step.capture_error}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the check (the parent) -------------------------------------------------------------------------------


def run_check(
    device: str, names: list[str], steps: int, batch: int | None, jobs: int, budget_s: float, log: Any, save: Any
) -> list[dict[str, Any]]:
    """Every row, ``jobs`` processes at a time, taking turns on the device; ``save(rows)`` after each one.
    Rows not started within ``budget_s`` are recorded as not run."""
    todo = [(n, o, p, batch or _config(n).batch_size, "plain") for n in names for p in PRECISIONS for o in OPTIMIZERS]
    todo += [(names[0], "laperm", "fp32", batch or _config(names[0]).batch_size, kind) for kind in KINDS[1:]]
    rows: list[dict[str, Any] | None] = [None] * len(todo)
    deadline, guard = time.monotonic() + budget_s, threading.Lock()
    with tempfile.TemporaryDirectory(prefix="laperm-gpu-check-") as tmp:

        def one(i: int) -> None:
            name, optimizer, precision, b, kind = todo[i]
            row = _run_row(name, optimizer, precision, b, device, steps, Path(tmp) / "device.lock", deadline, kind)
            with guard:
                rows[i] = row
                log(_log_line(row))
                save([r for r in rows if r is not None])

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(one, range(len(todo))))
    return [r for r in rows if r is not None]


def _run_row(
    name: str,
    optimizer: str,
    precision: str,
    batch: int,
    device: str,
    steps: int,
    lock: Path,
    deadline: float,
    kind: str,
) -> dict[str, Any]:
    ident = _ident(name, optimizer, precision, batch, steps, kind)
    left = deadline - time.monotonic()
    if left <= 0:
        error = {"returncode": None, "traceback": "not run: the check's time budget was spent", "command": ""}
        return {**ident, "device": device, "ok": False, "error": error}
    args = ["row", name, "--optimizer", optimizer, "--precision", precision, "--device", device]
    args += ["--steps", str(steps), "--batch", str(batch), "--lock", str(lock)]
    args += ["--threads", str(torch.get_num_threads()), "--kind", kind]
    result, error = isolate.run_isolated("benchmarks.gpu_check", args, timeout=min(ROW_TIMEOUT_S, left + 30))
    return result if error is None else {**ident, "device": device, "ok": False, "error": error}


def _log_line(r: dict[str, Any]) -> str:
    head = f"{_model_cell(r)} {r['optimizer']} {r['precision']}"
    if r.get("error"):
        return f"FAILED {head} (exit {r['error']['returncode']}):\n{r['error']['traceback']}"
    return (
        f"{'ok' if r['ok'] else 'NOT OK'} {head}: captured {r['captured']}, loss fast {r['loss_fast']:.4f} "
        f"eager {r['loss_eager']:.4f} (diff {r['loss_diff']:.2e}; worst step {r['step_diff_max']:.2e}), "
        f"{r['images_per_s_fast']:,.0f} img/s fast"
    )


def _model_cell(r: dict[str, Any]) -> str:
    kind = r.get("kind", "plain")
    return r["model"] if kind == "plain" else f"{r['model']} ({kind})"


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(res: dict[str, Any]) -> str:
    """The check as markdown: header, the table, then notes (warnings) and failures (tracebacks)."""
    head = ["model", "optimizer", "precision", "batch", "captured", "loss eager (first → final)", "loss fast"]
    head += ["abs diff (tolerance)", "worst step: abs diff (step)", "img/s fast", "img/s eager", "ok"]
    lines, notes, fails = [], [], []
    for r in res["rows"]:
        ident = [_model_cell(r), r["optimizer"], r["precision"], r["batch"]]
        if r.get("error"):
            lines.append(ident + ["", "", "", "", "", "", "", f"**failed** (exit {r['error']['returncode']})"])
            fails.append(
                f"*{' '.join(map(str, ident[:3]))}* (`{r['error']['command']}`):\n\n````\n{r['error']['traceback']}\n````\n"
            )
            continue
        tol = r["tolerance"]["rtol"] * abs(r["loss_eager"]) + r["tolerance"]["atol"]
        captured = "n/a (no graph)" if r["captured"] is None else ("yes" if r["captured"] else "**NO**")
        lines.append(
            ident
            + [captured, f"{r['loss_eager_first']:.4f} → {r['loss_eager']:.4f}", f"{r['loss_fast']:.4f}"]
            + [f"{r['loss_diff']:.2e} ({'<=' if r['within_tolerance'] else '**>**'} {tol:.3f})"]
            + [f"{r['step_diff_max']:.2e} ({r['step_diff_max_at']}){'' if r['steps_within_tolerance'] else ' **>**'}"]
            + [
                _fmt(r["images_per_s_fast"], ",.0f"),
                _fmt(r["images_per_s_eager"], ",.0f"),
                "yes" if r["ok"] else "**NO**",
            ]
        )
        notes += [f"- {' '.join(map(str, ident[:3]))}: {w}" for w in r["warnings"]]
    return "\n".join(
        [f"# GPU check: {res['device']}", "", md_table(["", ""], [[k, v] for k, v in _summary(res).items()]), ""]
        + [md_table(head, lines), ""]
        + (["## Warnings", "", *notes, ""] if notes else [])
        + (["## Failures", "", *fails] if fails else [])
    )


def _summary(res: dict[str, Any]) -> dict[str, str]:
    rows = res["rows"]
    bad = [r for r in rows if not r.get("ok")]
    tol = "; ".join(f"{p}: rtol {a}, atol {b}" for p, (a, b) in TOLERANCE.items())
    return {
        "verdict": res["verdict"],
        "rows ok": f"{len(rows) - len(bad)} of {len(rows)} ({res['expected_rows']} expected)",
        "CUDA-only tests": res["tests"] or "not run",
        "device": f"{res['device']}; torch {res['torch']}",
        "commit": res["commit"],
        "date": res["date"],
        "command": f"`{res['command']}`",
        "steps": f"{res['steps']} per run (eager, then fast; LaPerm syncs every min(k, {SYNC_EVERY}, steps // 3) steps)",
        "loss": "every step's, and the final: the mean over the last steps // 6 steps; each within "
        f"|fast - eager| <= rtol |eager| + atol ({tol}); why: benchmarks/gpu_check.py, TOLERANCE",
        "rows": f"every model x {'/'.join(PRECISIONS)} x {'/'.join(OPTIMIZERS)}, plus {', '.join(KINDS[1:])} "
        "(the first model, LaPerm fp32): benchmarks/gpu_check.py, KINDS",
        "img/s": "from the steps after warm-up and capture, up to the last ones; indicative only",
    }


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=isolate.ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=isolate.ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    if out.returncode != 0:
        return "unknown (not a git checkout)"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (not available)"
    return f"cpu ({torch.get_num_threads()} threads)"


def _tests_summary(log: Path | None, rc: int | None) -> str | None:
    """The CUDA-only tests' pytest summary line and exit status (None: not run)."""
    if log is None and rc is None:
        return None
    last = ""
    if log is not None and log.exists():
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip("= ") if lines else "(empty log)"
    return f"{last or '(no log)'} (exit {rc}; log: {log.name if log else '-'})"


def _result(a: argparse.Namespace, names: list[str], rows: list[dict[str, Any]], done: bool) -> dict[str, Any]:
    expected = len(names) * len(PRECISIONS) * len(OPTIMIZERS) + len(KINDS) - 1
    bad = [r for r in rows if not r.get("ok")]
    tests_failed = a.tests_rc not in (None, 0)
    if not done:
        verdict = f"INCOMPLETE: {len(rows)} of {expected} rows so far"
    elif bad or len(rows) != expected or tests_failed:
        parts = [f"{len(bad)} row(s) not ok"] + (["the CUDA-only tests failed"] if tests_failed else [])
        verdict = "FAIL: " + ", ".join(parts)
    else:
        what = "captured and trained like eager" if a.device == "cuda" else "trained like eager (CPU: no graph)"
        verdict = f"PASS: every row {what}" + ("" if a.tests_rc is None else "; the CUDA-only tests passed")
    return {
        "verdict": verdict,
        "device": _device_name(a.device),
        "torch": torch.__version__,
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
        "steps": a.steps,
        "tolerance": {p: {"rtol": r, "atol": t} for p, (r, t) in TOLERANCE.items()},
        "tests": _tests_summary(a.tests_log, a.tests_rc),
        "tests_rc": a.tests_rc,
        "expected_rows": expected,
        "rows": rows,
    }


def _write(out: Path, res: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "gpu-check.md").write_text(markdown(res))


def _check(a: argparse.Namespace) -> int:
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU and torch sees none; smoke-test with --device cpu --quick")
        return 2
    names = a.models.split(",") if a.models else (list(QUICK["models"]) if a.quick else fast_models())
    unknown = sorted(set(names) - set(fast_models()))
    if unknown:
        print(f"error: not image models that --mode fast trains: {', '.join(unknown)}; choose from {fast_models()}")
        return 2
    batch = a.batch or (QUICK["batch"] if a.quick else None)
    log = lambda m: print(m, flush=True)  # noqa: E731
    save = lambda rows: _write(a.out, _result(a, names, rows, done=False))  # noqa: E731
    rows = run_check(a.device, names, a.steps, batch, a.jobs, a.budget, log, save)
    res = _result(a, names, rows, done=True)
    _write(a.out, res)
    print(f"\n{markdown(res)}\nwrote {a.out / 'gpu-check.json'} and {a.out / 'gpu-check.md'}\n{res['verdict']}")
    return 0 if res["verdict"].startswith("PASS") else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="role", required=True)
    c = sub.add_parser("check", help="every row, each in its own process; writes gpu-check.json and gpu-check.md")
    c.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    c.add_argument("--out", type=Path, default=Path("/tmp/gpu-out"))
    c.add_argument("--quick", action="store_true", help=f"a smoke run: models {QUICK['models']}, few steps, batch 8")
    c.add_argument("--models", help="comma-separated models (default: every image model --mode fast accepts)")
    c.add_argument("--steps", type=int, help=f"steps per run (default {STEPS}; quick {QUICK['steps']})")
    c.add_argument("--batch", type=int, help="batch size (default: the preset's; quick 8)")
    c.add_argument("--jobs", type=int, default=4, help="row processes at a time (they take turns on the device)")
    c.add_argument(
        "--budget", type=float, help="seconds; rows not started by then are not run (default 160; quick 600)"
    )
    c.add_argument("--tests-log", type=Path, help="the CUDA-only tests' pytest log, to summarise")
    c.add_argument("--tests-rc", type=int, help="their exit status")
    r = sub.add_parser("row", help="one row (a child process of check)")
    r.add_argument("model")
    r.add_argument("--optimizer", choices=OPTIMIZERS, required=True)
    r.add_argument("--precision", choices=PRECISIONS, required=True)
    r.add_argument("--device", required=True)
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--batch", type=int, required=True)
    r.add_argument("--lock", type=Path)
    r.add_argument("--threads", type=int)
    r.add_argument("--kind", choices=KINDS, default="plain")
    r.add_argument("--result", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.role == "check":
        a.steps = a.steps or (QUICK["steps"] if a.quick else STEPS)
        a.budget = a.budget or (600.0 if a.quick else 160.0)
        if a.steps < 4:
            ap.error(f"--steps must be at least 4 (warm-up, timed and final steps), got {a.steps}")
        return _check(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    key = f"row:{a.model}:{a.optimizer}:{a.precision}" + ("" if a.kind == "plain" else f":{a.kind}")
    return isolate.child_main(
        key,
        a.result,
        lambda: check_row(a.model, a.optimizer, a.precision, torch.device(a.device), a.steps, a.batch, a.lock, a.kind),
    )


if __name__ == "__main__":
    sys.exit(main())
