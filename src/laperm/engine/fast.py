"""``--mode fast``: the Trainer's data and step strategies for the device-resident fast path (docs/gpu.md).

The Trainer's loop is the same in both modes; ``mode`` only chooses what it plugs in:

* data -- :func:`device_loaders` swaps the host training loader for a
  :class:`~laperm.data.device.DeviceBatches` over the same images, order seed, batch size and
  augmentation preset (validation, test and BatchNorm-calibration loaders are unchanged);
* step -- :class:`FastUpdate` runs :class:`~laperm.fast.step.DeviceStep` (a CUDA graph on CUDA,
  eager on CPU) and accumulates loss and accuracy into the Trainer's own running totals, which the
  Trainer reads every ``FLUSH_EVERY`` steps, as in eager mode.

What is identical to eager mode: on CPU, the sample order (both draw ``randperm`` from a CPU
generator with the same seed) and, in fp32 without L2 or augmentation, every weight.  What differs:
the augmentation (drawn on a device generator, one batched resample), the coupled L2 term (summed
by ``_foreach_norm``: equal to float rounding), and on CUDA the order (a CUDA generator).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..build import Loaders
from ..config import ConfigError, TrainConfig
from ..data import BatchLoader
from ..data.augment import Augment
from ..data.device import DeviceBatches
from ..data.text import WindowLoader
from ..fast.graph import GraphFactory
from ..fast.step import DeviceStep
from ..optim import LaPerm

__all__ = ["device_loaders", "FastUpdate", "GRAPH_FACTORY"]

# The step's graph factory (None: a CUDA graph on CUDA, none elsewhere).  A test sets a stand-in here to
# drive ``laperm train --mode fast`` through the graph path on CPU (tests/test_capture_failsafe.py).
GRAPH_FACTORY: GraphFactory | None = None


def device_loaders(loaders: Loaders, channels_last: bool) -> Loaders:
    """``loaders`` with the training loader replaced by its device-resident equivalent."""
    host = loaders.train
    if isinstance(host, WindowLoader):
        raise ConfigError("mode fast trains image models; a text run needs --mode eager")
    if not isinstance(host, BatchLoader) or host.shard[1] != 1:
        raise ConfigError("mode fast needs one process and the host training loader; use --mode eager")
    rows = host.indices if host.indices is not None else torch.arange(host.n)
    augment = host.augment
    if augment is not None and not isinstance(augment, Augment):
        raise ConfigError(f"mode fast applies the augmentation presets only, got {augment!r}; use --mode eager")
    try:
        train = DeviceBatches(
            host.x.index_select(0, rows.to(host.x.device)),
            host.y.index_select(0, rows.to(host.y.device)),
            host.batch_size,
            seed=host.seed,  # the host loader's order seed: on CPU both draw the same permutations
            device=host.device,
            mean=host.mean,
            std=host.std,
            augment=augment,
            drop_last=host.drop_last,
            channels_last=channels_last,
        )
    except ValueError as e:
        raise ConfigError(f"mode fast: {e}") from None
    return dataclasses.replace(loaders, train=train)


class FastUpdate:
    """The fast step strategy: ``update(xb, yb, batch)`` runs one :class:`DeviceStep`.

    Loss and accuracy go into ``loss_acc``/``correct_acc`` (the Trainer's tensors, shared, never
    replaced: a CUDA graph writes to them in place), so the Trainer's flush, checkpoints and resume
    treat them exactly as in eager mode.  Build it after the optimizer state is loaded (resume):
    the graph is captured at the first steps, after that.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        l2: float,
        l2_params: Sequence[Tensor],
        totals: tuple[Tensor, Tensor],
    ) -> None:
        inner = opt.base_optimizer if isinstance(opt, LaPerm) else opt
        on_cuda = next(model.parameters()).device.type == "cuda"
        # A graph needs a capturable inner step (build.build_optimizer makes Adam so in fast mode on CUDA).
        graph = GRAPH_FACTORY is not None or (on_cuda and all(g.get("capturable", False) for g in inner.param_groups))
        self.step = DeviceStep(
            model,
            opt,
            l2=l2,
            l2_params=l2_params,
            loss_scale=cfg.loss_scale,
            logit_scale=cfg.logit_scale,
            precision=cfg.precision,
            channels_last=cfg.channels_last,
            graph=graph,
            graph_factory=GRAPH_FACTORY,
        )
        self.step.loss_sum, self.step.correct = totals

    def __call__(self, xb: Tensor, yb: Tensor, batch: int) -> None:
        self.step(xb, yb)

    def reset_graph(self) -> None:
        """After anything replaces the optimizer's state tensors."""
        self.step.reset_graph()
