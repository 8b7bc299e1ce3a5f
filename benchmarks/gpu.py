"""GPU fast path: training throughput, the batched CUDA sync, and several runs on one GPU.

What ``python -m benchmarks --device cuda`` measures (issue 13), for Conv2, Conv4, Conv7, Conv13
and ResNet50 at their presets' batch (50) and k:

* **throughput** -- images/s of training steps (:class:`laperm.fast.step.DeviceStep` fed by
  :class:`laperm.data.device.DeviceBatches`: synthetic uint8 images of the model's input shape on
  the device, the preset's augmentation), for LaPerm(Adam) and Adam, ``mode`` "eager" (no graph)
  and "fast" (CUDA graph; channels_last for the convnets), ``precision`` fp32 and bf16.  Each
  contender warms up (capture included), then runs whole multiples of k steps where its time cap
  allows (so LaPerm's syncs are counted at their real frequency), timed with a device sync at
  both ends.
* **sync** -- one full ``LaPerm.sync()`` of the model (finite check, batched segmented sort,
  scatter, copy back) against a plain ``torch.sort`` of the same rows stacked per row length (the
  floor: the sort alone), medians of CUDA-event timings.
* **parallel** -- ``runs`` copies of the Conv2 fast LaPerm step in separate processes at once
  (started together, each timing a fixed window), summed, against one alone.

Every sync and throughput contender runs in a process of its own (:mod:`benchmarks.isolate`,
``python -m benchmarks.gpu sync|throughput ...``): on an H200 one failed CUDA-graph capture made every
later contender of the same process fail (issue 21).  A contender that fails, hangs or dies becomes a
row whose figures are empty and whose ``error`` holds its return code and full traceback; the
markdown lists them under "Failures".  The JSON and markdown are rewritten after every row.

With ``quick`` (any device, CPU in the tests) everything is shrunk to a smoke run: the numbers
mean nothing.  The figures go to a JSON file in the issue's schema; :func:`markdown` renders them.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from laperm import models, reconnect
from laperm.config import resolve_config
from laperm.data.augment import make_augment
from laperm.data.device import DeviceBatches
from laperm.experiments.parallel import run_parallel
from laperm.fast.step import DeviceStep, make_adam
from laperm.optim import LaPerm, laperm_param_groups

from . import isolate
from .common import md_table, median

MODELS = ("conv2", "conv4", "conv7", "conv13", "resnet50")
QUICK_MODELS = ("conv2", "conv7")
CONTENDERS = [  # (optimizer, mode, precision)
    ("laperm", "fast", "fp32"),
    ("adam", "fast", "fp32"),
    ("laperm", "fast", "bf16"),
    ("adam", "fast", "bf16"),
    ("laperm", "eager", "fp32"),
]
PARALLEL_RUNS = (2, 4)
BUDGET_S = {"throughput": 240.0}  # whole-section caps (the script's 10 minutes), process starts included
# Each contender is a fresh process (benchmarks.isolate): an estimate of its start (import torch, CUDA
# context) taken off the throughput budget before it is shared out, and what a contender may spend on
# setup, warm-up and capture beyond its time cap before it is killed as hung.
STARTUP_S, CAPTURE_ALLOWANCE_S, SYNC_TIMEOUT_S = 4.0, 150.0, 120.0
VALUES = {"throughput": ("images_per_s",), "sync": ("laperm_ms", "torch_sort_ms")}  # empty in a failed row
TARGETS = {"conv2": 100_000, "conv7": 40_000, "resnet50": 20_000}  # issue 21 (conv2, resnet50), issue 13 (conv7)


def _setup(
    name: str, optimizer: str, mode: str, precision: str, device: torch.device, quick: bool
) -> tuple[DeviceStep, DeviceBatches, int]:
    """Model, optimizer, step and data as the preset trains them; returns (step, data, k)."""
    cfg = resolve_config({"preset": name})
    spec = models.get_spec(name)
    model = models.build(name, seed=0).to(device)
    model.train()
    conv = len(spec.input_shape) == 3
    channels_last = mode == "fast" and conv and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # before the optimizer, as DeviceStep asks
    inner = make_adam(laperm_param_groups(model), lr=cfg.lr, eps=cfg.adam_eps, device=device)
    opt = LaPerm(inner, k=cfg.k) if optimizer == "laperm" else inner
    step = DeviceStep(
        model,
        opt,
        l2=spec.l2,
        l2_params=model.l2_parameters() if spec.l2 else [],  # type: ignore[operator]
        loss_scale=cfg.loss_scale,
        precision=precision,
        channels_last=channels_last,
        graph=mode == "fast" and device.type == "cuda",
    )
    batch = 4 if quick else cfg.batch_size
    n = 64 if quick else 10_000  # synthetic images held on the device (the speed does not depend on their number)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *spec.input_shape), dtype=torch.uint8, generator=g)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    data = DeviceBatches(
        x,
        y,
        batch,
        seed=0,
        device=device,
        mean=(0.5,),
        std=(0.25,),
        augment=make_augment(cfg.augment),
        channels_last=channels_last,
    )
    return step, data, cfg.k


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(data: DeviceBatches):  # type: ignore[no-untyped-def]
    while True:
        yield from data


def throughput_one(
    name: str, optimizer: str, mode: str, precision: str, device: torch.device, quick: bool, cap_s: float
) -> dict[str, Any]:
    """Images/s of one contender: warm-up, then whole multiples of k steps while within ``cap_s``."""
    step, data, k = _setup(name, optimizer, mode, precision, device, quick)
    batches = _batches(data)
    warm = 2 if quick else 20
    for _ in range(warm):
        step(*next(batches))
    _sync(device)
    chunk = 2 if quick else k  # one sync period per chunk
    done, start = 0, time.perf_counter()
    while True:
        for _ in range(chunk):
            step(*next(batches))
        _sync(device)
        done += chunk
        elapsed = time.perf_counter() - start
        if quick or elapsed > cap_s / 2 or done >= 4 * chunk:
            break
    step.read_metrics()
    return {
        "model": name,
        "optimizer": optimizer,
        "batch": data.batch_size,
        "mode": mode,
        "precision": precision,
        "images_per_s": done * data.batch_size / elapsed,
    }


def sync_one(name: str, device: torch.device, quick: bool) -> dict[str, Any]:
    """A full ``LaPerm.sync()`` against ``torch.sort`` of the same rows (stacked per row length), in ms."""
    model = models.build(name, seed=0).to(device)
    opt = LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-3), k=1000)
    params = [p for _, p in opt.permuted_parameters()]
    by_length: dict[int, list[torch.Tensor]] = {}
    for p in params:
        rows = reconnect.to_rows(p.detach(), opt.layout_of(p))
        by_length.setdefault(rows.shape[1], []).append(rows)
    stacks = [torch.cat(rs) for rs in by_length.values()]

    def run_sync() -> None:  # (a radix sort's time does not depend on how ordered the rows already are)
        opt.sync()

    def run_sort() -> None:
        for s in stacks:
            torch.sort(s, dim=1, stable=True)

    repeats = 2 if quick else 25
    return {
        "model": name,
        "laperm_ms": _time_ms(run_sync, device, repeats),
        "torch_sort_ms": _time_ms(run_sort, device, repeats),
    }


def _time_ms(fn: Any, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` after a warm-up (CUDA events on CUDA, the host clock elsewhere)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return median(times)


def worker(name: str, device: str, start_at: float, seconds: float, quick: bool) -> dict[str, Any]:
    """One of the parallel runs: fast LaPerm fp32 steps, timed over ``[start_at, start_at + seconds]``."""
    dev = torch.device(device)
    step, data, _ = _setup(name, "laperm", "fast", "fp32", dev, quick)
    batches = _batches(data)
    for _ in range(2 if quick else 20):  # warm-up and capture, before the common start
        step(*next(batches))
    _sync(dev)
    while time.time() < start_at:
        time.sleep(0.001)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(1 if quick else 50):
            step(*next(batches))
        _sync(dev)
        done += 1 if quick else 50
    return {"images_per_s": done * data.batch_size / (time.perf_counter() - start)}


def parallel_one(name: str, runs: int, device: torch.device, quick: bool, seconds: float) -> float:
    """Summed images/s of ``runs`` worker processes (the ``--parallel`` launcher) timed over the same window."""
    lead = 4.0 if quick else 25.0  # process start, CUDA context, warm-up and capture before the window opens
    start_at = time.time() + lead
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu",
        "worker",
        name,
        "--device",
        str(device),
        "--start-at",
        str(start_at),
        "--seconds",
        str(seconds),
    ] + (["--quick"] if quick else [])
    with tempfile.TemporaryDirectory() as tmp:  # (each run its own process: own CUDA context, allocator, graph)
        codes = run_parallel([cmd] * runs, runs, log_dir=Path(tmp))
        logs = [(Path(tmp) / f"run-{i}.log").read_text() for i in range(runs)]
    failed = [i for i, c in enumerate(codes) if c]
    if failed:
        log = logs[failed[0]][-isolate.OUTPUT_KEPT :]
        raise RuntimeError(f"parallel benchmark worker {failed[0]} failed (exit codes {codes}); its output:\n{log}")
    return sum(json.loads(log.strip().splitlines()[-1])["images_per_s"] for log in logs)


def run(device: torch.device, quick: bool, log: Any = print, save: Any = None) -> dict[str, Any]:
    """Every figure of the GPU section, in the issue's JSON schema, each contender in its own process
    (:mod:`benchmarks.isolate`).  A contender that fails becomes a row with its error (return code and
    full traceback) and the next one runs; ``save(res)`` is called after every row (a run cut short
    keeps what it measured)."""
    names = QUICK_MODELS if quick else MODELS
    out: dict[str, Any] = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "throughput": [],
        "sync": [],
        "parallel": [],
    }
    save = save or (lambda res: None)
    common = ["--device", str(device), "--threads", str(torch.get_num_threads())] + (["--quick"] if quick else [])
    for name in names:
        out["sync"].append(_isolated_row(log, "sync", {"model": name}, ["sync", name, *common], SYNC_TIMEOUT_S))
        save(out)
    contenders = CONTENDERS[:3] if quick else CONTENDERS
    cap = max(2.0, (BUDGET_S["throughput"] - STARTUP_S * len(names) * len(contenders)) / (len(names) * len(contenders)))
    for name in names:
        for optimizer, mode, precision in contenders:
            ident = {"model": name, "optimizer": optimizer, "batch": _batch(name, quick), "mode": mode}
            ident["precision"] = precision
            args = ["throughput", name, "--optimizer", optimizer, "--mode", mode, "--precision", precision]
            args += ["--cap", f"{cap:.2f}", *common]
            out["throughput"].append(_isolated_row(log, "throughput", ident, args, cap + CAPTURE_ALLOWANCE_S))
            save(out)
    _run_parallel_rows(out, device, quick, log, save)
    return out


def _isolated_row(log: Any, what: str, ident: dict[str, Any], args: list[str], timeout: float) -> dict[str, Any]:
    """One contender in its own process: its result row, or ``ident`` with empty values and the error."""
    t = time.perf_counter()
    result, error = isolate.run_isolated("benchmarks.gpu", args, timeout)
    took = time.perf_counter() - t
    if error is None:
        log(f"{what} {result} ({took:.1f} s)")
        return {**result, "error": None}
    log(f"FAILED {what} {ident} (exit {error['returncode']}, {took:.1f} s):\n{error['traceback']}")
    return {**ident, **dict.fromkeys(VALUES[what]), "error": error}


def _run_parallel_rows(out: dict[str, Any], device: torch.device, quick: bool, log: Any, save: Any) -> None:
    """Conv2 runs side by side (each a process already): one alone, then each of ``PARALLEL_RUNS``."""
    seconds = 1.0 if quick else 12.0
    single, single_error = _parallel_attempt(log, 1, device, quick, seconds)
    for runs in PARALLEL_RUNS[:1] if quick else PARALLEL_RUNS:
        total, error = _parallel_attempt(log, runs, device, quick, seconds)
        row = {"model": "conv2", "runs": runs, "single_images_per_s": single, "aggregate_images_per_s": total}
        out["parallel"].append({**row, "error": single_error or error})
        log(f"parallel {out['parallel'][-1]}")
        save(out)


def _parallel_attempt(
    log: Any, runs: int, device: torch.device, quick: bool, seconds: float
) -> tuple[float | None, dict[str, Any] | None]:
    t = time.perf_counter()
    try:
        return parallel_one("conv2", runs, device, quick, seconds), None
    except Exception:  # noqa: BLE001 (becomes the row's error; the next measurement runs)
        tb = traceback.format_exc()
        log(f"FAILED parallel conv2 x{runs} ({time.perf_counter() - t:.1f} s):\n{tb}")
        return None, {"returncode": None, "traceback": tb.rstrip("\n"), "command": f"parallel_one conv2 x{runs}"}


def _batch(name: str, quick: bool) -> int:
    return 4 if quick else resolve_config({"preset": name}).batch_size


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def goals(res: dict[str, Any]) -> list[list[str]]:
    """The issues' targets against the measured figures: [what, measured, target, met].  Failed rows
    count as not met where they are the only figure (a model whose every LaPerm contender failed)."""
    ok = {key: [r for r in res[key] if not r.get("error")] for key in ("throughput", "sync", "parallel")}
    rows = []
    for name, target in TARGETS.items():
        tried = [r for r in res["throughput"] if r["model"] == name and r["optimizer"] == "laperm"]
        best = max(((r["images_per_s"], r["batch"]) for r in ok["throughput"] if r in tried), default=None)
        what = f"{name} LaPerm, batch {tried[0]['batch'] if tried else '?'}, one run, images/s (best mode)"
        if best is not None:
            rows.append([what, f"{best[0]:,.0f}", f">= {target:,}", _mark(best[0] >= target)])
        elif tried:
            rows.append([what, "failed", f">= {target:,}", _mark(False)])
    for r in ok["throughput"]:
        same = ("model", "mode", "precision")
        adam = next((a for a in ok["throughput"] if a["optimizer"] == "adam" and all(a[f] == r[f] for f in same)), None)
        if r["optimizer"] == "laperm" and adam:
            ratio = r["images_per_s"] / adam["images_per_s"]
            what = f"LaPerm / Adam images/s, {r['model']} {r['mode']} {r['precision']}"
            rows.append([what, f"{ratio:.3f}", ">= 0.97", _mark(ratio >= 0.97)])
    for r in ok["sync"]:
        ratio = r["laperm_ms"] / r["torch_sort_ms"]
        rows.append([f"{r['model']} sync / torch.sort floor", f"{ratio:.2f}", "<= 1.5", _mark(ratio <= 1.5)])
    for r in ok["parallel"]:
        ratio = r["aggregate_images_per_s"] / r["single_images_per_s"]
        what = f"{r['model']} {r['runs']} parallel runs / one run, images/s"
        rows.append([what, f"{ratio:.2f}", ">= 2.5", _mark(ratio >= 2.5)])
    return rows


def _mark(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def _value(r: dict[str, Any], key: str, fmt: str) -> str:
    """A figure of a row, or where its contender failed, that (the traceback is under 'Failures')."""
    if r.get("error"):
        return f"**failed** (exit {r['error']['returncode']}; see Failures)"
    return format(r[key], fmt)


def failures(res: dict[str, Any]) -> str:
    """Markdown: every failed contender with its return code and full traceback ('' when none failed)."""
    parts = []
    for key in ("sync", "throughput", "parallel"):
        for r in res[key]:
            if r.get("error"):
                name = " ".join(
                    str(v) for k, v in r.items() if k in ("model", "optimizer", "mode", "precision", "runs")
                )
                e = r["error"]
                parts.append(
                    f"*{key} {name}* (exit {e['returncode']}; `{e['command']}`):\n\n````\n{e['traceback']}\n````\n"
                )
    return "**Failures** (each contender ran in its own process)\n\n" + "\n".join(parts) if parts else ""


def markdown(res: dict[str, Any]) -> str:
    """The GPU section of docs/benchmarks.md."""
    t = md_table(
        ["model", "optimizer", "batch", "mode", "precision", "images/s"],
        [
            [r["model"], r["optimizer"], r["batch"], r["mode"], r["precision"], _value(r, "images_per_s", ",.0f")]
            for r in res["throughput"]
        ],
    )
    s = md_table(
        ["model", "LaPerm.sync() ms", "torch.sort ms", "ratio"],
        [
            [r["model"], _value(r, "laperm_ms", ".3f"), _value(r, "torch_sort_ms", ".3f")]
            + ["" if r.get("error") else f"{r['laperm_ms'] / r['torch_sort_ms']:.2f}"]
            for r in res["sync"]
        ],
    )
    p = md_table(
        ["model", "runs", "one run images/s", "aggregate images/s", "ratio"],
        [
            [
                r["model"],
                r["runs"],
                _value(r, "single_images_per_s", ",.0f"),
                _value(r, "aggregate_images_per_s", ",.0f"),
            ]
            + ["" if r.get("error") else f"{r['aggregate_images_per_s'] / r['single_images_per_s']:.2f}"]
            for r in res["parallel"]
        ],
    )
    g = md_table(["what", "measured", "target", "met"], goals(res))
    fails = failures(res)
    return (
        f"Device: {res['device']}, torch {res['torch']}. Method: `benchmarks/gpu.py` (each contender in its own "
        "process: `benchmarks/isolate.py`); figures also in `docs/benchmarks-gpu.json`; how the fast path works: "
        f"`docs/gpu.md`.\n\n**Targets (issues 13 and 21)**\n\n{g}\n\n"
        f"**Training throughput** (synthetic data on the device, the preset's augmentation)\n\n{t}\n\n"
        f"**Sync** (one full sync of every permuted tensor)\n\n{s}\n\n**Runs side by side on one GPU**\n\n{p}\n"
        + (f"\n{fails}" if fails else "")
    )


def _main(argv: list[str] | None = None) -> int:
    """A contender's process: ``sync``/``throughput`` write their row to ``--result`` (benchmarks.isolate);
    ``worker`` (a run of the parallel measurement) prints its images/s."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description="one contender of the GPU benchmark")
    ap.add_argument("role", choices=["worker", "sync", "throughput"])
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--optimizer", choices=["laperm", "adam"], default="laperm")
    ap.add_argument("--mode", choices=["fast", "eager"], default="fast")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--cap", type=float, default=10.0, help="throughput: time cap in seconds")
    ap.add_argument("--start-at", type=float, help="worker: when the common window opens (time.time())")
    ap.add_argument("--seconds", type=float, help="worker: the window's length")
    ap.add_argument("--threads", type=int, help="torch threads (the parent's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--result", type=Path, help="sync, throughput: where the JSON result goes")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.role == "worker":
        if a.start_at is None or a.seconds is None:
            ap.error("worker needs --start-at and --seconds")
        print(json.dumps(worker(a.model, a.device, a.start_at, a.seconds, a.quick)), flush=True)
        return 0
    if a.result is None:
        ap.error(f"{a.role} needs --result FILE")
    dev = torch.device(a.device)
    if a.role == "sync":
        return isolate.child_main(f"sync:{a.model}", a.result, lambda: sync_one(a.model, dev, a.quick))
    key = f"throughput:{a.model}:{a.optimizer}:{a.mode}:{a.precision}"
    return isolate.child_main(
        key, a.result, lambda: throughput_one(a.model, a.optimizer, a.mode, a.precision, dev, a.quick, a.cap)
    )


if __name__ == "__main__":
    sys.exit(_main())
