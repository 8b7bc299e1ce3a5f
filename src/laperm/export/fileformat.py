"""The compact file format on disk: θ0 rebuilt from a recipe, reading/writing files, and run folders.

The byte format itself is :mod:`laperm.export.codec`; ``laperm export`` (the command) is in
:mod:`laperm.cli`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import checkpoint, rundir
from ..build import build_model
from ..config import ConfigError, TrainConfig
from ..data.text import read_vocab
from ..models import UnknownModelError, state_numel
from ..reconnect import RowLayout
from ..rundir import RunDirError
from . import codec
from .codec import MAGIC, SUFFIX, CompactFormatError, Decoded, encode_compact, state_dict_nbytes, theta0_digest

__all__ = [
    "check_recipe",
    "rebuild_theta0",
    "run_recipe",
    "decode_compact",
    "save_compact",
    "load_compact",
    "read_compact",
    "is_compact_file",
    "ExportResult",
    "export_run",
    "check_against_run",
]


RECIPE_FIELDS = ("model", "init", "seed", "model_options")


def _recipe_text(recipe: object) -> str:
    text = repr(recipe)
    return text if len(text) <= 200 else text[:200] + "..."


def check_recipe(recipe: object) -> int:
    """Check a θ0 recipe from a file against the model registry before anything is built; returns
    how many numbers the model's ``state_dict`` holds (counted on the meta device, nothing allocated).

    Known fields only; a known model and init, a seed in range (:class:`TrainConfig`'s checks), and
    ``model_options`` the registry lists for that model, within their bounds."""
    try:
        if not isinstance(recipe, Mapping) or set(recipe) - set(RECIPE_FIELDS):
            raise TypeError(f"a recipe is a mapping of {', '.join(RECIPE_FIELDS)}")
        options = recipe.get("model_options") or {}
        if not isinstance(options, dict):
            raise TypeError("model_options is not a mapping")
        cfg = TrainConfig(model=recipe["model"], init=recipe["init"], seed=recipe["seed"]).validate()
        return state_numel(cfg.model, **options)
    except (KeyError, TypeError, ValueError, ConfigError, UnknownModelError) as e:
        raise CompactFormatError(f"the θ0 recipe {_recipe_text(recipe)} is refused ({e})") from None


def rebuild_theta0(recipe: Mapping[str, Any]) -> dict[str, Tensor]:
    """θ0 (a CPU ``state_dict``) rebuilt from ``{"model", "init", "seed"}`` as ``laperm train`` builds it
    (and ``"model_options"``, what the model took from the data: a text model's ``vocab_size``).

    The recipe is checked first (:func:`check_recipe`): one from a file never builds an oversized model."""
    check_recipe(recipe)
    try:
        cfg = TrainConfig(model=recipe["model"], init=recipe["init"], seed=recipe["seed"]).validate()
        model, _ = build_model(cfg, torch.device("cpu"), **(recipe.get("model_options") or {}))
    except (KeyError, TypeError, ConfigError, UnknownModelError) as e:
        raise CompactFormatError(f"the θ0 recipe {_recipe_text(recipe)} cannot be rebuilt ({e})") from None
    return {k: v.detach() for k, v in model.state_dict().items()}


def decode_compact(data: bytes, theta0: Mapping[str, Tensor] | None = None, *, where: str = "data") -> Decoded:
    """Decode bytes made by :func:`encode_compact`; θ0 from ``theta0``, else stored, else rebuilt from the recipe."""
    return codec.decode_compact(data, theta0, where=where, rebuild=rebuild_theta0)


def save_compact(
    path: str | Path,
    state_dict: Mapping[str, Tensor],
    theta0: Mapping[str, Tensor],
    layouts: Mapping[str, RowLayout],
    **options: Any,
) -> int:
    """Write :func:`encode_compact`'s bytes atomically to ``path``; returns the file size."""
    data = encode_compact(state_dict, theta0, layouts, **options)
    checkpoint.atomic_write_bytes(path, data)
    return len(data)


def read_compact(path: str | Path) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise CompactFormatError(f"{path} is a folder, not a compact checkpoint") from None
    except OSError as e:
        raise CompactFormatError(f"cannot read {path}: {e.strerror or e}") from None


def load_compact(path: str | Path, theta0: Mapping[str, Tensor] | None = None) -> OrderedDict[str, Tensor]:
    """The model ``state_dict`` stored in compact checkpoint ``path``, bit-exactly.

    θ0 comes from the file (``--with-theta0``), else from its recipe; pass
    ``theta0`` for models outside laperm's registry.
    """
    return decode_compact(read_compact(path), theta0, where=str(path)).state_dict


def is_compact_file(path: str | Path) -> bool:
    """True when ``path`` is a file starting like a compact checkpoint."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# -- run folders and the command ---------------------------------------------------------


@dataclass
class ExportResult:
    path: Path
    nbytes: int
    state_dict_nbytes: int
    bits: dict[str, tuple[int, int]]  # permuted tensor -> (bits per weight, weights)

    @property
    def ratio(self) -> float:
        """Compact size over the size of the float32 ``state_dict`` file."""
        return self.nbytes / self.state_dict_nbytes

    @property
    def permuted_weights(self) -> int:
        return sum(n for _, n in self.bits.values())

    @property
    def mean_bits(self) -> float:
        """Bits per permuted weight, averaged over weights."""
        return sum(b * n for b, n in self.bits.values()) / max(self.permuted_weights, 1)


def export_run(
    run_dir: str | Path, out: str | Path | None = None, *, which: str = "final", with_theta0: bool = False
) -> ExportResult:
    """Write the compact checkpoint of ``RUN_DIR/{which}.pt`` (default ``RUN_DIR/{which}.laperm``).

    The written bytes are decoded and compared bit for bit with the weights
    before the file is written, so an export that succeeds reloads exactly.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a folder; pass a laperm run folder")
    cfg = rundir.read_run_config(run_dir)
    init = checkpoint.load(run_dir / "init.pt")
    if not (isinstance(init, dict) and isinstance(init.get("state"), dict)):
        raise RunDirError(f"{run_dir / 'init.pt'} is not a laperm init record")
    if not init.get("permuted"):
        raise RunDirError(
            f"{run_dir} was trained without LaPerm ({init.get('optimizer')}): there are no "
            f"permutations to store; use {which}.pt as it is"
        )
    if not (run_dir / f"{which}.pt").is_file():
        raise RunDirError(f"{run_dir} has no {which}.pt; finish or --resume the run first")
    saved = checkpoint.load(run_dir / f"{which}.pt")
    state = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise RunDirError(f"{run_dir / which}.pt holds no model weights")
    theta0 = init["state"]
    layouts = {r["name"]: RowLayout.from_record(r) for r in init["permuted"]}
    recipe = run_recipe(run_dir, cfg)
    if not with_theta0:
        names = [n for n in state if n in layouts]
        rebuilt = rebuild_theta0(recipe)
        if any(n not in rebuilt for n in names) or theta0_digest(rebuilt, names) != theta0_digest(theta0, names):
            raise RunDirError(
                f"the run's recipe (model {recipe['model']}, init {recipe['init']}, seed "
                f"{recipe['seed']}) no longer rebuilds its init.pt bit for bit; "
                "export with --with-theta0"
            )
    try:
        data = encode_compact(state, theta0, layouts, recipe=recipe, with_theta0=with_theta0, config=cfg)
    except ValueError as e:
        raise RunDirError(f"cannot export {run_dir / which}.pt: {e}") from None
    back = codec.decode_compact(data, theta0).state_dict
    bad = [k for k in state if not codec.same_bits(back[k], state[k].cpu())]
    if bad or list(back) != list(state):
        raise RunDirError(
            f"internal error: the compact form of {', '.join(bad) or 'the keys'} does not reload "
            "bit-exactly; please report it"
        )
    out = Path(out) if out is not None else run_dir / f"{which}{SUFFIX}"
    checkpoint.atomic_write_bytes(out, data)
    header, _ = codec.parse_compact(data, str(out))
    bits = {e["name"]: (e["bits"], e["rows"] * e["cols"]) for e in header["tensors"] if e["kind"] == "codes"}
    return ExportResult(out, len(data), state_dict_nbytes(state), bits)


def run_recipe(run_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """What rebuilds the run's θ0 (:func:`rebuild_theta0`): model, init, seed (text runs: and the vocabulary's size)."""
    recipe = {"model": cfg.get("model"), "init": cfg.get("init"), "seed": cfg.get("seed")}
    if (run_dir / rundir.VOCAB).is_file():
        recipe["model_options"] = {"vocab_size": len(read_vocab(run_dir / rundir.VOCAB))}
    return recipe


_recipe = run_recipe  # the former private name


def check_against_run(path: str | Path, run_dir: str | Path, which: str = "final") -> list[str]:
    """Names of tensors whose reloaded value differs (in bits) from ``RUN_DIR/{which}.pt``."""
    saved = checkpoint.load(Path(run_dir) / f"{which}.pt")["model"]
    loaded = load_compact(path)
    if list(loaded) != list(saved):
        return ["(the set or order of tensors)"]
    return [k for k in saved if not codec.same_bits(loaded[k], saved[k].cpu())]
