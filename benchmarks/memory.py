"""Memory: what LaPerm keeps beyond its inner optimizer, and peak process memory.

* **Kept state** (``LaPerm.extra_memory_bytes()``): the sorted θ0, dense or
  run-length encoded, relative to the bytes of the permuted parameters, for a
  dense, a pruned (p = 0.9) and a shared-value (the F2 preset) init.
* **Kernel scratch**: the CPU sync kernel keeps per-thread block buffers
  (int64 keys and two int32 halves, about 1 MiB per thread) and a shared
  ``arange``; they do not grow with the model.  Counted separately, with
  ``tracemalloc`` (numpy reports its allocations to it) in a fresh process:
  *kept* is what stays allocated after a sync, *transient* the peak during it
  (e.g. the dense rows rebuilt from a run-length encoding).
* **Peak RSS** of a short LaPerm(Adam) run and of the same Adam run, each in a
  fresh subprocess (``ru_maxrss``), on Conv13 (15 M weights) so that θ0's
  copy is visible above the fixed cost of the Python/torch runtime.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import torch

from laperm import reconnect
from laperm.config import resolve_config
from laperm.optim import LaPerm
from laperm.train import build_model, build_optimizer

# (label, config layers).  Conv7 for dense and pruned: its first layer, which the
# paper's pruning keeps at >= 80%, holds only 288 of its weights.
INITS = (
    ("dense", {"model": "conv7"}),
    ("pruned p=0.9", {"model": "conv7", "init": "pruned:0.9"}),
    ("shared value (F2 preset)", {"preset": "f2"}),
    ("dense", {"model": "conv13"}),
)
TARGETS = {"dense": 1.0, "shared value (F2 preset)": 0.05}


def _laperm(layers: dict) -> LaPerm:
    cfg = resolve_config(layers)
    model, _ = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, LaPerm)
    return opt


def kept_state(quick: bool = False) -> list[dict]:
    """Bytes of sorted θ0 per init, against the permuted parameters' bytes (this process)."""
    rows = []
    for label, layers in INITS[:3] if quick else INITS:
        opt = _laperm(layers)
        permuted = sum(p.numel() * p.element_size() for _, p in opt.permuted_parameters())
        extra = opt.extra_memory_bytes()
        encodings = sorted({opt.storage_of(p) for _, p in opt.permuted_parameters()})
        target = TARGETS.get(label)
        rows.append(
            {
                "init": label,
                "model": resolve_config(layers).model,
                "storage": "+".join(encodings),
                "permuted_bytes": permuted,
                "extra_bytes": extra,
                "ratio": extra / permuted,
                "target": target,
                "met": None if target is None else extra / permuted <= target,
            }
        )
    return rows


def _child_scratch(quick: bool) -> dict:
    """In a fresh process: numpy memory the sync kernel keeps / peaks at, per model synced in turn."""
    out = {"threads": reconnect.get_num_threads(), "arange_bytes": int(reconnect._AR.nbytes), "after": []}
    for label, layers in INITS[:3] if quick else INITS:
        opt = _laperm(layers)
        with torch.no_grad():
            for _, p in opt.permuted_parameters():  # inner weights a little off θ0, as between syncs
                p.add_(torch.randn_like(p), alpha=1e-3)
        tracemalloc.start()
        opt.sync()
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["after"].append(
            {"init": label, "model": resolve_config(layers).model, "kept_bytes": kept, "transient_peak_bytes": peak}
        )
    return out


def _child_peak(optimizer: str, model: str, steps: int, batch: int) -> dict:
    """In a fresh process: train ``steps`` steps and report the peak resident set size."""
    cfg = resolve_config({"model": model, "optimizer": optimizer, "k": 2})
    net, _ = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(cfg, net)
    spec_shape = (3, 32, 32) if model.startswith(("conv2", "conv4", "conv13", "resnet")) else (1, 28, 28)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *spec_shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    for _ in range(steps):  # k=2: half of the steps end in a sync
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    extra = opt.extra_memory_bytes() if isinstance(opt, LaPerm) else 0
    return {
        "optimizer": optimizer,
        "model": model,
        "steps": steps,
        "batch": batch,
        "params": sum(p.numel() for p in net.parameters()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "extra_bytes": extra,
    }


def _spawn(*argss: list[str]) -> list[dict]:
    """Run ``python -m benchmarks.memory ARGS`` for each ARGS, all at once; their JSON results."""
    root = Path(__file__).resolve().parents[1]  # so that `-m benchmarks.memory` resolves from anywhere
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.memory", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        for args in argss
    ]
    out = []
    for args, proc in zip(argss, procs):
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"benchmarks.memory {' '.join(args)} failed:\n{stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _threads() -> list[str]:
    return ["--threads", str(torch.get_num_threads())]


def subprocess_measurements(quick: bool = False) -> tuple[dict, list[dict]]:
    """(kernel scratch, [peak RSS of LaPerm, of Adam]), each measured in fresh processes.

    Peak RSS is per process, so processes can run side by side without
    disturbing each other's numbers: the scratch probe and the first LaPerm and
    Adam runs start together, later repeats in pairs.  Peak RSS: median of the
    repeats.
    """
    model, steps, batch, repeats = ("f1", 2, 16, 1) if quick else ("conv13", 4, 8, 3)
    threads = ["--threads", str(torch.get_num_threads())]
    opts = ("laperm", "adam")
    peak_args = [
        [
            "--child",
            "peak",
            "--optimizer",
            opt,
            "--model",
            model,
            "--steps",
            str(steps),
            "--batch",
            str(batch),
            *threads,
        ]
        for opt in opts
    ]
    scratch, *first = _spawn(["--child", "scratch", *(["--quick"] if quick else []), *threads], *peak_args)
    runs = [first] + [_spawn(*peak_args) for _ in range(repeats - 1)]
    out = []
    for i in range(len(opts)):
        r = dict(runs[0][i])
        r["peak_rss_bytes"] = sorted(run[i]["peak_rss_bytes"] for run in runs)[len(runs) // 2]
        out.append(r)
    return scratch, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="memory benchmark helpers (run by `python -m benchmarks`)")
    ap.add_argument("--child", choices=["scratch", "peak"], required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--optimizer", default="laperm")
    ap.add_argument("--model", default="conv13")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "scratch":
        result = _child_scratch(args.quick)
    else:
        result = _child_peak(args.optimizer, args.model, args.steps, args.batch)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
