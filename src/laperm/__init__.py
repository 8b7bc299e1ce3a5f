"""laperm: train neural networks by reconnecting their weights (Lookahead Permutation).

>>> from laperm import LaPerm, laperm_param_groups
>>> opt = LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-3), k=20)
"""

from .layouts import UntrainableError, UntrainableWarning, register_unit_dim
from .optim import LaPerm, LaPermError, laperm_param_groups
from .overview import describe

__version__ = "0.2.0"  # the one source: pyproject.toml reads it, `laperm --version` prints it; CHANGELOG.md
__all__ = [
    "LaPerm",
    "LaPermError",
    "laperm_param_groups",
    "describe",
    "register_unit_dim",
    "UntrainableError",
    "UntrainableWarning",
    "__version__",
]
