"""LaPerm on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 shards every parameter on dim 0, so each output unit's row of weights
lies whole on one rank: each rank syncs its own rows, with no communication
beyond FSDP2's own.  The script trains an MLP on a synthetic task, saves a
``torch.distributed.checkpoint`` mid-run, resumes a fresh model from it and
checks that the resumed run lands on the same weights, then verifies that
every trained row is a permutation of its initial values.

    python examples/fsdp2.py                           # 2 CPU processes (gloo), spawned here
    torchrun --nproc-per-node 2 examples/fsdp2.py      # or launched by torchrun (NCCL on GPUs)
    python examples/fsdp2.py --nproc 1                 # the same global batches, unsharded

``--out DIR`` writes DIR/result.pt (θ0, the final weights, whether the resume was exact).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from laperm import LaPerm, laperm_param_groups
from laperm.reconnect import is_row_permutation

warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # (one process: DCP saves locally)

GLOBAL_BATCH, STEPS, SAVE_AT, K = 32, 40, 17, 5


def build(world: int, device: torch.device) -> tuple[nn.Module, LaPerm]:
    torch.manual_seed(0)  # the same θ0 on every rank
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # Parameters are DTensors sharded on dim 0 now: LaPerm captures θ0 per local shard.
    return model, LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-2), k=K)


def batch(step: int, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of global batch ``step`` (the same global batches whatever the world size)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 24, generator=g)
    y = (x[:, :12].sum(1) > x[:, 12:].sum(1)).long() + 2 * (x[:, 0] > 0).long()
    return x[rank::world].to(device), y[rank::world].to(device)


def train(model: nn.Module, opt: LaPerm, steps: range, rank: int, world: int, device: torch.device) -> None:
    for step in steps:
        x, y = batch(step, rank, world, device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) weights, on every rank."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        for n, p in model.named_parameters()
    }


def run(rank: int, world: int, out: str | None, ckpt: str) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    model, opt = build(world, device)
    theta0 = full(model)
    train(model, opt, range(SAVE_AT), rank, world, device)
    model_sd, optim_sd = get_state_dict(model, opt)  # sorted θ0 and latent weights are sharded like the weights
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    train(model, opt, range(SAVE_AT, STEPS), rank, world, device)

    resumed, resumed_opt = build(world, device)  # a fresh job: same θ0, everything else from the checkpoint
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    set_state_dict(resumed, resumed_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    train(resumed, resumed_opt, range(SAVE_AT, STEPS), rank, world, device)
    exact = all(torch.equal(a, b) for a, b in zip(full(model).values(), full(resumed).values(), strict=True))

    opt.sync()  # end in a synced state: each rank syncs its own rows
    opt.verify()  # checks the local rows; the ranks agree on the outcome
    final = full(model)
    if rank == 0:
        for name, p in final.items():
            if p.dim() >= 2:
                assert is_row_permutation(p, theta0[name]), name
        print(
            f"{world} process(es): {STEPS} steps, k={K}; resumed from the step-{SAVE_AT} DCP checkpoint "
            f"{'exactly' if exact else 'NOT exactly'}; every weight row is a permutation of its initial values"
        )
        if out:
            torch.save({"theta0": theta0, "final": final, "resumed_exactly": exact}, Path(out) / "result.pt")


def _spawned(rank: int, world: int, port: int, out: str | None, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    _in_group(rank, world, out, folder)
    _exit_finished_worker()


def _in_group(rank: int, world: int, out: str | None, folder: str | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    finished = False
    try:
        with _agreed_folder(out, folder) as where:
            run(rank, world, out, str(Path(where) / "dcp"))
        finished = True
    finally:
        _teardown(finished)


@contextlib.contextmanager
def _agreed_folder(out: str | None, folder: str | None) -> Iterator[str]:
    """The one folder every rank saves to and loads from: ``--out``, the launching process's temporary
    folder, or (under torchrun, where each rank is its own program) one that rank 0 makes and broadcasts.
    Each rank making its own would leave the others loading a checkpoint that is not there. (Across
    machines, pass ``--out`` on a filesystem they share.)"""
    if out or folder:
        yield out or folder  # type: ignore[misc]
        return
    made = [tempfile.mkdtemp(prefix="laperm-fsdp2-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(made, src=0)
    try:
        yield made[0]
        dist.barrier()  # every rank is done with it before rank 0 removes it
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(made[0], ignore_errors=True)


def _teardown(finished: bool) -> None:
    """End the process group so that every rank exits cleanly -- copy this into your own script.

    A rank that destroys its group while a peer still talks to it (writing, verifying) can take the
    peer's connections down and abort it at exit. So when every rank got through, all wait for each
    other first; after a failure there is no barrier (a peer may be gone, the launcher stops the rest).
    """
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def _exit_finished_worker() -> None:
    """End a worker that finished without the interpreter's shutdown: its output is flushed and its
    process group destroyed, and skipping the C++ destructors at exit avoids a rare SIGABRT
    ("terminate called without an active exception") from a communication thread torn down there,
    which would fail a job that did all its work."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--out", help="folder for result.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:  # launched by torchrun: the ranks agree on a folder among themselves
        _in_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.out, None)
        _exit_finished_worker()
    with tempfile.TemporaryDirectory() as tmp:
        if args.nproc == 1:
            run(0, 1, args.out, str(Path(args.out or tmp) / "dcp"))
        else:
            torch.multiprocessing.spawn(_spawned, args=(args.nproc, _free_port(), args.out, tmp), nprocs=args.nproc)


if __name__ == "__main__":
    main()
