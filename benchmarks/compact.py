"""Compact checkpoints (``laperm export``): size against a float32 ``state_dict`` file.

Training is simulated: every permuted row of θ0 gets a uniformly random
permutation, which is what a trained row looks like to a compressor (and the
worst case for one).  θ0 is built exactly as ``laperm train`` builds it, and
each file is decoded again (θ0 rebuilt from its recipe) and compared bit for
bit with the weights.
"""

from __future__ import annotations

import torch

from laperm import export, reconnect
from laperm.config import resolve_config
from laperm.train import build_model, build_optimizer

# (label, config layers, with_theta0, max ratio)
CASES = (
    ("F2, shared value (preset f2)", {"preset": "f2"}, False, 1 / 16),
    ("Conv7, dense (preset conv7)", {"preset": "conv7"}, False, 0.4),
    ("Conv7, pruned p=0.9", {"preset": "conv7", "init": "pruned:0.9"}, False, None),
    ("lenet300, dense", {"model": "lenet300"}, False, None),
    ("Conv7, dense, θ0 stored (--with-theta0)", {"preset": "conv7"}, True, None),
)


def simulated_run(layers: dict, seed: int = 0):
    """(trained-like state_dict, θ0, layouts, recipe) for a config."""
    cfg = resolve_config(layers)
    model, _ = build_model(cfg, torch.device("cpu"))
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(cfg, model)
    layouts = {name: opt.layout_of(p) for name, p in opt.permuted_parameters()}
    g = torch.Generator().manual_seed(seed)
    final = {k: v.clone() for k, v in theta0.items()}
    for name, layout in layouts.items():
        rows = reconnect.to_rows(final[name], layout).clone()
        perm = torch.argsort(torch.rand(rows.shape, generator=g), dim=1)
        reconnect.from_rows_(final[name], rows.gather(1, perm), layout)
    return final, theta0, layouts, {"model": cfg.model, "init": cfg.init, "seed": cfg.seed}


def run(quick: bool = False) -> list[dict]:
    rows = []
    for label, layers, with_theta0, target in CASES[:2] if quick else CASES:
        final, theta0, layouts, recipe = simulated_run(layers)
        data = export.encode_compact(final, theta0, layouts, recipe=recipe, with_theta0=with_theta0)
        back = export.decode_compact(data).state_dict
        exact = list(back) == list(final) and all(export._same_bits(back[k], final[k]) for k in final)
        header, _ = export._parse(data, label)
        codes = [e for e in header["tensors"] if e["kind"] == "codes"]
        weights = sum(e["rows"] * e["cols"] for e in codes)
        reference = export.state_dict_nbytes(final)
        ratio = len(data) / reference
        rows.append(
            {
                "case": label,
                "bytes": len(data),
                "state_dict_bytes": reference,
                "ratio": ratio,
                "bits_per_weight": sum(e["bits"] * e["rows"] * e["cols"] for e in codes) / weights,
                "bit_exact": exact,
                "target": target,
                "met": None if target is None else (ratio <= target and exact),
            }
        )
    return rows
