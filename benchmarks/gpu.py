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

With ``quick`` (any device, CPU in the tests) everything is shrunk to a smoke run: the numbers
mean nothing.  The figures go to a JSON file in the issue's schema; :func:`markdown` renders them.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
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
BUDGET_S = {"throughput": 240.0}  # whole-section caps (the script's 10 minutes)
TARGETS = {"conv2": 40_000, "conv7": 40_000, "resnet50": 20_000}


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
        raise RuntimeError(f"parallel benchmark worker failed (exit codes {codes}): {logs[failed[0]][-2000:]}")
    return sum(json.loads(log.strip().splitlines()[-1])["images_per_s"] for log in logs)


def run(device: torch.device, quick: bool, log: Any = print) -> dict[str, Any]:
    """Every figure of the GPU section, in the issue's JSON schema.  A contender that fails is logged
    and left out (one bad configuration must not cost the whole GPU session's figures)."""
    names = QUICK_MODELS if quick else MODELS
    out: dict[str, Any] = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "throughput": [],
        "sync": [],
        "parallel": [],
    }
    for name in names:
        _attempt(out["sync"], "sync", log, sync_one, name, device, quick)
    cap = BUDGET_S["throughput"] / (len(names) * len(CONTENDERS))
    for name in names:
        for optimizer, mode, precision in CONTENDERS[:3] if quick else CONTENDERS:
            _attempt(
                out["throughput"],
                "throughput",
                log,
                throughput_one,
                name,
                optimizer,
                mode,
                precision,
                device,
                quick,
                cap,
            )
    seconds = 1.0 if quick else 12.0
    single = _attempt([], "parallel", log, parallel_one, "conv2", 1, device, quick, seconds)
    for runs in PARALLEL_RUNS[:1] if quick else PARALLEL_RUNS:
        total = _attempt([], "parallel", log, parallel_one, "conv2", runs, device, quick, seconds)
        if single and total:
            out["parallel"].append(
                {"model": "conv2", "runs": runs, "single_images_per_s": single, "aggregate_images_per_s": total}
            )
            log(f"parallel {out['parallel'][-1]}")
    return out


def _attempt(rows: list, what: str, log: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` appended to ``rows`` and returned; on failure the error is logged and None returned."""
    t = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 (reported, then the next measurement runs)
        log(f"FAILED {what} {args[:4]}: {type(e).__name__}: {e}")
        return None
    rows.append(result)
    log(f"{what} {result} ({time.perf_counter() - t:.1f} s)")
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def goals(res: dict[str, Any]) -> list[list[str]]:
    """The issue's targets against the measured figures: [what, measured, target, met]."""
    rows = []
    for name, target in TARGETS.items():
        best = max(
            (
                (r["images_per_s"], r["batch"])
                for r in res["throughput"]
                if r["model"] == name and r["optimizer"] == "laperm"
            ),
            default=None,
        )
        if best is not None:
            rows.append(
                [
                    f"{name} LaPerm, batch {best[1]}, one run, images/s (best mode)",
                    f"{best[0]:,.0f}",
                    f">= {target:,}",
                    _mark(best[0] >= target),
                ]
            )
    for r in res["throughput"]:
        adam = next(
            (
                a
                for a in res["throughput"]
                if a["optimizer"] == "adam" and all(a[f] == r[f] for f in ("model", "mode", "precision"))
            ),
            None,
        )
        if r["optimizer"] == "laperm" and adam:
            ratio = r["images_per_s"] / adam["images_per_s"]
            rows.append(
                [
                    f"LaPerm / Adam images/s, {r['model']} {r['mode']} {r['precision']}",
                    f"{ratio:.3f}",
                    ">= 0.97",
                    _mark(ratio >= 0.97),
                ]
            )
    for r in res["sync"]:
        if r["model"] == "conv13":
            ratio = r["laperm_ms"] / r["torch_sort_ms"]
            rows.append(["Conv13 CUDA sync / torch.sort floor", f"{ratio:.2f}", "<= 1.5", _mark(ratio <= 1.5)])
    for r in res["parallel"]:
        ratio = r["aggregate_images_per_s"] / r["single_images_per_s"]
        rows.append(
            [
                f"{r['model']} {r['runs']} parallel runs / one run, images/s",
                f"{ratio:.2f}",
                ">= 2.5",
                _mark(ratio >= 2.5),
            ]
        )
    return rows


def _mark(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def markdown(res: dict[str, Any]) -> str:
    """The GPU section of docs/benchmarks.md."""
    t = md_table(
        ["model", "optimizer", "batch", "mode", "precision", "images/s"],
        [
            [r["model"], r["optimizer"], r["batch"], r["mode"], r["precision"], f"{r['images_per_s']:,.0f}"]
            for r in res["throughput"]
        ],
    )
    s = md_table(
        ["model", "LaPerm.sync() ms", "torch.sort ms", "ratio"],
        [
            [
                r["model"],
                f"{r['laperm_ms']:.3f}",
                f"{r['torch_sort_ms']:.3f}",
                f"{r['laperm_ms'] / r['torch_sort_ms']:.2f}",
            ]
            for r in res["sync"]
        ],
    )
    p = md_table(
        ["model", "runs", "one run images/s", "aggregate images/s", "ratio"],
        [
            [
                r["model"],
                r["runs"],
                f"{r['single_images_per_s']:,.0f}",
                f"{r['aggregate_images_per_s']:,.0f}",
                f"{r['aggregate_images_per_s'] / r['single_images_per_s']:.2f}",
            ]
            for r in res["parallel"]
        ],
    )
    g = md_table(["what", "measured", "target", "met"], goals(res))
    return (
        f"Device: {res['device']}, torch {res['torch']}. Method: `benchmarks/gpu.py`; figures also in "
        f"`docs/benchmarks-gpu.json`; how the fast path works: `docs/gpu.md`.\n\n**Targets (issue 13)**\n\n{g}\n\n"
        f"**Training throughput** (synthetic data on the device, the preset's augmentation)\n\n{t}\n\n"
        f"**Sync** (one full sync of every permuted tensor)\n\n{s}\n\n**Runs side by side on one GPU**\n\n{p}\n"
    )


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description="a parallel-benchmark worker")
    ap.add_argument("role", choices=["worker"])
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--start-at", type=float, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(worker(a.model, a.device, a.start_at, a.seconds, a.quick)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
