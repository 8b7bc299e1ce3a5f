"""Shrink the JPEG CIFAR-10 zip for transport, losslessly, and rebuild it.

The GPU machine this project borrows takes at most 64 MiB of files per call, and
the JPEG CIFAR-10 copy (../shared/data/cifar10/cifar10-jpg.zip) is 63 MB. Its
60,000 JPEGs share one 623-byte header (quantisation and Huffman tables), so
storing that header once and each file's remaining bytes back to back gives
~18 MB. ``unpack`` writes a zip with the same member names and byte-identical
JPEG files, so the decoded pixels are the same.

    python scripts/cifar_jpeg_pack.py pack ../shared/data/cifar10/cifar10-jpg.zip .devpack/cifar
    python scripts/cifar_jpeg_pack.py unpack .devpack/cifar /tmp/cifar10/cifar10-jpg.zip
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from collections import Counter
from pathlib import Path


def _split(data: bytes) -> int:
    """Length of the JPEG header up to and including the start-of-scan segment."""
    k = data.find(b"\xff\xda")
    if k < 0:
        raise ValueError("no start-of-scan marker")
    return k + 2 + int.from_bytes(data[k + 2 : k + 4], "big")


def pack(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist() if not i.is_dir()]
    headers = Counter(data[: _split(data)] for _, data in members)
    table = [h for h, _ in headers.most_common()]
    index = {h: i for i, h in enumerate(table)}
    entries, digest = [], hashlib.sha256()
    with open(dest / "body.bin", "wb") as body:
        for name, data in members:
            cut = _split(data)
            entries.append([name, index[data[:cut]], len(data) - cut])
            body.write(data[cut:])
            digest.update(data)
    (dest / "headers.bin").write_bytes(b"".join(table))
    meta = {"headers": [len(h) for h in table], "members": entries, "sha256_of_members": digest.hexdigest()}
    (dest / "index.json").write_text(json.dumps(meta))
    print(f"{len(members)} files, {len(table)} distinct header(s) -> {dest}")


def unpack(src: Path, dest: Path) -> None:
    meta = json.loads((src / "index.json").read_text())
    raw = (src / "headers.bin").read_bytes()
    table, pos = [], 0
    for n in meta["headers"]:
        table.append(raw[pos : pos + n])
        pos += n
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src / "body.bin", "rb") as body, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        for name, h, n in meta["members"]:
            data = table[h] + body.read(n)
            digest.update(data)
            z.writestr(name, data)
    if digest.hexdigest() != meta["sha256_of_members"]:
        raise SystemExit("unpacked files differ from the packed ones")
    print(f"{len(meta['members'])} files -> {dest} (contents verified)")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        raise SystemExit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(Path(sys.argv[2]), Path(sys.argv[3]))
