"""``train()`` never destroys a process group it did not create, and always tears down its own."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from laperm.config import ConfigError, TrainConfig
from laperm.train import train


def tiny(tmp_path, **changes) -> TrainConfig:
    fields = dict(
        model="f1",
        dataset="synthetic",
        epochs=1,
        batch_size=64,
        val_size=64,
        k=3,
        device="cpu",
        out=str(tmp_path),
        name="run",
        progress=False,
        threads=1,
    )
    return TrainConfig(**{**fields, **changes})


@pytest.fixture
def users_group(tmp_path):
    """The caller's own (1-process, gloo) process group, as a user's script would create it."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def still_works(group) -> bool:
    t = torch.ones(2)
    dist.all_reduce(t, group=group)
    return dist.is_initialized() and dist.group.WORLD is group and torch.equal(t, torch.ones(2))


def test_train_inside_a_users_process_group_leaves_it_alive(users_group, tmp_path, clean_engine_state):
    summary = train(tiny(tmp_path), log=lambda _: None)
    assert summary["verified"] and summary["steps"] > 0
    assert still_works(users_group)


def test_a_failing_train_leaves_a_users_process_group_alive(users_group, tmp_path, clean_engine_state):
    with pytest.raises(ConfigError, match="val_size"):
        train(tiny(tmp_path, val_size=10**6), log=lambda _: None)
    assert still_works(users_group)


@pytest.mark.slow
def test_train_tears_down_the_group_it_created_on_a_config_error_after_setup(tmp_path):
    """Two ranks launched as torchrun would: the batch does not split over them, which is found after setup."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import torch.distributed as dist
        from laperm.config import ConfigError, TrainConfig
        from laperm.train import train
        cfg = TrainConfig(model="f1", dataset="synthetic", epochs=1, batch_size=33, val_size=64, device="cpu",
                          out={str(tmp_path)!r}, progress=False)
        try:
            train(cfg, log=lambda _: None)
        except ConfigError as e:
            assert "divisible by nproc 2" in str(e), e
            print("initialized after the error:", dist.is_initialized())
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "OMP_NUM_THREADS": "1",
            },
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "initialized after the error: False" in out
