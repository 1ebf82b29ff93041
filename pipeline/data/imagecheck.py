"""Cheap validity check of encoded image bytes, before they go into a shard unchanged.

1. The header must be a known image signature (JPEG, PNG, GIF, BMP, WebP, TIFF): catches empty files,
   HTML error pages and text saved as ``.jpg``.
2. PIL parses the header and runs ``verify()`` (PNG: every chunk's CRC up to IEND).
3. Truncation: a JPEG must end with its EOI marker; one that does not is decoded in full and rejected
   only if the decode fails (some cameras append bytes after EOI). GIF, BMP, WebP and TIFF, whose
   ``verify()`` checks little, are always decoded in full.

Returns the format name or the reason the bytes were rejected; never raises for bad data.
"""
from __future__ import annotations

import io

from PIL import Image, ImageFile

SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff(data: bytes) -> str | None:
    """The image format the leading bytes announce, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((fmt for magic, fmt in SIGNATURES if data.startswith(magic)), None)


def _full_decode(data: bytes) -> None:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # some libraries switch it on globally; a check must not
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def check_image(data: bytes) -> tuple[str | None, str | None]:
    """``(format, None)`` for usable bytes, ``(None, reason)`` otherwise."""
    if not data:
        return None, "empty file"
    fmt = sniff(data)
    if fmt is None:
        return None, f"not an image (unrecognised header {data[:8]!r})"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        if fmt == "jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            _full_decode(data)
        elif fmt in ("gif", "bmp", "webp", "tiff"):
            _full_decode(data)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error)
        return None, f"unreadable {fmt}: {type(exc).__name__}: {exc}"
    return fmt, None
