"""accelerate: prepare + save_state / load_state with LaPerm."""

import runpy
from pathlib import Path

import torch

from laperm.reconnect import is_row_permutation

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "with_accelerate.py"


def test_accelerate_save_state_load_state_resumes_exactly(tmp_path):
    ex = runpy.run_path(str(EXAMPLE))
    _, model0, *_ = ex["setup"]()
    theta0 = {n: p.detach().clone() for n, p in model0.named_parameters()}
    full = ex["train"](save_at=10, state_dir=str(tmp_path))
    resumed = ex["train"](save_at=10, state_dir=str(tmp_path), resume=True)
    for (n, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n
        if a.dim() >= 2:
            assert is_row_permutation(a, theta0[n]) and not torch.equal(a, theta0[n])
