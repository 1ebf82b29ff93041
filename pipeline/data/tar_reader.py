"""Read the samples of one shard straight from its tar headers.

The shard stage writes plain ustar archives (:mod:`pipeline.data.sharding`): per sample ``<key>.cls``,
``<key>.jpg`` and ``<key>.json``, one 512-byte header each, no pax or GNU extension records. Python's
``tarfile`` (which webdataset's ``tarfile_samples`` wraps) decodes every field of every header in
Python and keeps a TarInfo per member: for small images that was about a third of the features stage's
time outside the model (``bench/features_throughput.py --profile``). Here a header costs its name, size,
type and checksum, the members a reader does not want are skipped with a seek, and the rest is what
webdataset yields: ``{"__key__": key, "<suffix>": bytes, ...}`` per sample, in written order.

Anything else in an archive (a pax or long-name record, a link, a bad checksum, a member cut short) raises
:class:`TarFormatError` naming the file and the offset; a shard cut at a header boundary just ends, as it
does for ``tarfile`` (the manifest check then reports the missing samples).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

BLOCK = 512
_REGULAR = (b"0", b"\0")  # a regular file: '0', or NUL in pre-POSIX archives


class TarFormatError(ValueError):
    """A shard that is not the plain ustar archive the shard stage writes."""


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].rstrip(b" \0")
    # the checksum is the byte sum of the header with its own field read as eight spaces
    return bool(stored) and int(stored, 8) == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _member_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8")


def tar_members(path: str | Path, suffixes: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
    """``(member name, data)`` of the regular members of ``path`` whose names end with one of ``suffixes``,
    in archive order; other members are skipped without being read."""
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            offset = f.tell()
            header = f.read(BLOCK)
            if len(header) < BLOCK or header == b"\0" * BLOCK:
                if 0 < len(header) < BLOCK:
                    raise TarFormatError(f"{path}: a header cut short at byte {offset}")
                return  # end of archive (zero block, or cut at a header boundary)
            if not _checksum_ok(header):
                raise TarFormatError(f"{path}: bad header checksum at byte {offset} (damaged shard)")
            kind = header[156:157]
            if kind not in _REGULAR:
                raise TarFormatError(f"{path}: member type {kind!r} at byte {offset}; the shard stage writes "
                                     "plain files only (rewrite the shards with `dvc repro -f -s shard`)")
            name = _member_name(header)
            size = int(header[124:136].rstrip(b" \0") or b"0", 8)
            padded = -(-size // BLOCK) * BLOCK
            if name.endswith(suffixes):
                data = f.read(size)
                if len(data) < size:
                    raise TarFormatError(f"{path}: member {name!r} cut short ({len(data)} of {size} bytes)")
                f.seek(padded - size, 1)
                yield name, data
            else:
                f.seek(padded, 1)


def tar_samples(path: str | Path, suffixes: tuple[str, ...]) -> Iterator[dict]:
    """Samples of one shard as webdataset groups them: consecutive members sharing the name before the
    first dot of their base name, ``{"__key__": that name, "<rest of the name>": bytes, ...}``."""
    sample: dict | None = None
    for name, data in tar_members(path, suffixes):
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        key, suffix = name[:dot], name[dot + 1:]
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        sample[suffix] = data
    if sample is not None:
        yield sample
