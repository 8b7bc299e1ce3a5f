"""What the integrations share: finding LaPerm behind a framework's optimizer wrapper, and the
reconnected fraction between two synced states (the ``reconnected`` metric of ``laperm train``)."""

from __future__ import annotations

from typing import Any

import torch

from ..optim import LaPerm

# The attributes under which frameworks keep the optimizer they wrap: Lightning's
# LightningOptimizer (_optimizer), accelerate's AcceleratedOptimizer (optimizer).
_WRAPPED = ("optimizer", "_optimizer")


def find_laperm(optimizer: Any) -> LaPerm | None:
    """The :class:`~laperm.LaPerm` optimizer inside ``optimizer`` (itself, or behind a framework's
    wrapper such as accelerate's ``AcceleratedOptimizer``), else ``None``."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, LaPerm):
            return optimizer
        seen.add(id(optimizer))
        optimizer = next((getattr(optimizer, a) for a in _WRAPPED if hasattr(optimizer, a)), None)
    return None


class ReconnectionTracker:
    """Fraction of the permuted weights that changed since the previous synced state it saw.

    Call :meth:`update` only at synced weights (inside ``LaPerm.synced_weights()``, or after a
    sync): between two synced states every row is a permutation of its θ0 row, so a changed
    entry is a reconnection.  It keeps one copy of the permuted weights.
    """

    def __init__(self) -> None:
        self.previous: dict[str, torch.Tensor] | None = None
        self.last: float | None = None  # the most recent fraction

    @torch.no_grad()
    def update(self, opt: LaPerm) -> float | None:
        """The fraction since the previous call (``None`` the first time); remembers this state."""
        current = {name: p.detach().clone() for name, p in opt.permuted_parameters()}
        if self.previous is not None and current:
            moved = sum(int((current[n] != self.previous[n]).sum()) for n in current)
            self.last = moved / sum(t.numel() for t in current.values())
        self.previous = current
        return self.last if self.previous is not None and self.last is not None else None
