"""Compact checkpoints of LaPerm-trained networks (``laperm export``).

* :mod:`.codec` -- the byte format: per-row codes of initial values, bit-packed (no models, no files);
* :mod:`.fileformat` -- files and run folders: θ0 rebuilt from a recipe, save/load, ``export_run``.

The command itself is registered by :mod:`laperm.cli`; ``laperm verify`` on a compact
file is :func:`laperm.verify.verify_compact`.
"""

from .codec import (
    MAGIC,
    SUFFIX,
    CompactFormatError,
    Decoded,
    decode_rows,
    encode_compact,
    encode_rows,
    pack_bits,
    packed_size,
    parse_compact,
    same_bits,
    state_dict_nbytes,
    theta0_digest,
    unpack_bits,
)
from .fileformat import (
    ExportResult,
    check_against_run,
    decode_compact,
    export_run,
    is_compact_file,
    load_compact,
    read_compact,
    rebuild_theta0,
    save_compact,
)

_parse, _same_bits = parse_compact, same_bits  # the former private names

__all__ = [
    "CompactFormatError",
    "Decoded",
    "encode_compact",
    "decode_compact",
    "save_compact",
    "load_compact",
    "read_compact",
    "export_run",
    "check_against_run",
    "is_compact_file",
    "rebuild_theta0",
    "state_dict_nbytes",
    "theta0_digest",
    "parse_compact",
    "same_bits",
    "ExportResult",
    "MAGIC",
    "SUFFIX",
    "encode_rows",
    "decode_rows",
    "pack_bits",
    "unpack_bits",
    "packed_size",
]
