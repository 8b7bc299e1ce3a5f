"""Benchmarks for laperm: ``python -m benchmarks`` runs them all and writes docs/benchmarks.md.

Sections (each a module, also usable alone): ``sync`` (a full sync against the
sorting limit; ``python -m benchmarks.sync``), ``overhead`` (LaPerm(Adam) vs
Adam steps/s), ``memory`` (kept state, kernel scratch, peak RSS), ``engine``
(``laperm train`` vs a bare loop) and ``compact`` (``laperm export`` sizes).
"""
