"""Portable run state: ``laperm pack`` / ``laperm unpack``.

Run folders (finished or not) go into a few files within size limits -- a machine lent
for a short window can continue a run another one started:

* :mod:`.tensors` -- a loaded ``.pt`` object in few bytes: θ0 and LaPerm's sorted rows rebuilt,
  synced weights as per-row permutation codes, the rest exact and compressed;
* :mod:`.runs` -- one run folder as one package (what is carried, what stays behind), and back;
* :mod:`.plan` -- choosing what fits ``--max-total-mib``, parts of ``--max-file-mib``, plan.json/plan.md;
* :mod:`.unpack` -- everything checked first, then restored (refusing to replace runs that got further);
* :mod:`.names`, :mod:`.header`, :mod:`.bounds` -- what unpack trusts of a pack: names checked before
  anything touches the disk, headers and sizes checked against the recipe before anything is decoded.
"""

from .errors import PackError
from .plan import PLAN_JSON, PLAN_MD, pack_runs
from .unpack import unpack

__all__ = ["pack_runs", "unpack", "PackError", "PLAN_JSON", "PLAN_MD"]
