"""Write a domain's samples as deterministic webdataset shards, in parallel: raw bytes, or down-sized.

Output (one folder per domain; the format every downstream stage reads, see ``shards.py``)::

    <out_dir>/<split>-000000.tar ...   per sample: <key>.cls, <key>.jpg (raw file bytes), <key>.json
    <out_dir>/sizes.json               {shard basename: n}
    <out_dir>/manifest.json            classes, counts, shards, keys in shard order, skipped files + reasons,
                                       and per shard its sample count and sha256 (``shard_files``)

Determinism: samples are sorted by relative path, permuted with the seed, and cut into consecutive chunks
of ``maxcount``; chunk ``i`` becomes shard ``i`` whatever the number of workers, and every tar header field
is fixed, so re-runs and any worker count give byte-identical files. Workers are separate processes
(forkserver: never fork a process that holds torch's threads), one shard at a time each.

Bad data: every file's bytes are checked (:mod:`pipeline.data.imagecheck`) while being read for the
shard; bad files are left out and listed in the manifest with the reason. More than ``max_bad_fraction``
of a domain bad (counting non-image files found while listing) fails the domain, and nothing is written.
The ``.jpg`` member holds the bytes as they were, whatever the format (PNG for VisDA): every reader
decodes with PIL, which goes by content; the json member records the real format.

Stored size (``store_max_side``, the ``data.store_max_side`` param): ``None`` keeps the raw bytes. A number
``s`` stores every image whose SHORTER side is above ``s`` resized (bicubic, aspect kept) so that its shorter
side is ``s``: every preprocess downstream (open_clip's resize-shorter-side-then-centre-crop, CMKD's
Resize((256, 256)) and RandomResizedCrop) needs the shorter side, never the longer one, at its input size.
Resized images are re-encoded as JPEG at ``JPEG_QUALITY`` (PNG sources stay PNG: lossless); images already
at or below ``s`` keep their raw bytes. The result is a pure function of the bytes, so shards stay
byte-identical for any worker count. The manifest records ``store_max_side`` and ``jpeg_quality``; readers
check them against each model's input size (:func:`pipeline.data.transforms.check_store_size`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from PIL import Image

from pipeline.data.imagecheck import check_image
from pipeline.data.samples import Sample, Skipped, check_classes
from pipeline.io import atomic_dir, atomic_write_json
from pipeline.progress import bar, check_stop

log = logging.getLogger(__name__)

TAR_MTIME = 0  # fixed tar header fields so a re-run gives byte-identical shards (stable DVC hashes)
TAR_USER = TAR_GROUP = "uda"
TAR_MODE = 0o444
JPEG_QUALITY = 95  # re-encode quality of down-sized JPEGs (recorded in the manifest); PNGs stay lossless


class BadDataError(ValueError):
    """Too many files of a domain are unreadable, truncated or not images."""


def sample_key(relative_path: str) -> str:
    """An opaque, stable key for an image: a hash of its path below the domain (or list) root.

    Keys travel with every batch, also into the distill stage, which must not learn target labels: a key
    such as ``three/img_042`` would carry the class, so none is derived from the class or the file name.
    Hex digits only: periods would become webdataset extensions (faqs/0237).
    """
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:20]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
    info.uname, info.gname = TAR_USER, TAR_GROUP
    tar.addfile(info, io.BytesIO(data))


class _HashingFile:
    """A binary file that hashes what is written to it: the shard's sha256 without a second read."""

    def __init__(self, path: str):
        self.raw, self.sha256, self.size = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:  # tarfile asks once, when it opens
        return self.size

    def __enter__(self) -> "_HashingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.raw.close()


def stored_bytes(data: bytes, fmt: str, max_side: int | None) -> tuple[bytes, tuple[int, int] | None]:
    """The bytes to store for a checked image and, when it was resized, its original ``(width, height)``.

    ``max_side`` bounds the SHORTER side (see the module docstring); ``None`` or a small enough image gives
    ``data`` untouched. Down-sized: bicubic, aspect kept, PNG stays PNG, anything else becomes JPEG at
    ``JPEG_QUALITY`` (fixed encoder settings, so the same input always gives the same bytes).
    """
    if max_side is None:
        return data, None
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if min(w, h) <= max_side:
            return data, None
        scale = max_side / min(w, h)
        size = (max_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), max_side)
        png = fmt == "png"
        # Every reader converts to RGB; keep alpha only where PNG can store it.
        mode = "RGBA" if png and ("A" in img.getbands() or "transparency" in img.info) else "RGB"
        small = img.convert(mode).resize(size, Image.BICUBIC)
    out = io.BytesIO()
    if png:
        small.save(out, format="PNG", optimize=False)
    else:
        small.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False)
    return out.getvalue(), (w, h)


def write_one_shard(job: tuple[str, str, str, list[tuple[str, str, str, int, str]], int | None]
                    ) -> dict[str, Any]:
    """Write one tar: ``job = (tar_path, dataset, domain, [(key, relpath, path, label, classname), ...],
    store_max_side)``.

    Returns what went in (keys, labels, formats, bytes, the tar's sha256) and what was left out (relpath,
    reason).
    """
    tar_path, dataset, domain, entries, max_side = job
    keys, labels, bad, formats, nbytes, resized = [], [], [], {}, 0, 0
    out = _HashingFile(tar_path)
    with out, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, relpath, path, label, classname in entries:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                bad.append((relpath, f"unreadable file: {exc.strerror or exc}"))
                continue
            fmt, problem = check_image(data)
            if problem:
                bad.append((relpath, problem))
                continue
            meta = {"path": relpath, "dataset": dataset, "domain": domain, "classname": classname, "format": fmt}
            data, original = stored_bytes(data, fmt, max_side)
            if original is not None:
                meta["original_size"] = list(original)
                meta["format"] = "png" if fmt == "png" else "jpeg"
                resized += 1
            # Member order as webdataset's TarWriter writes it: extensions sorted.
            _add(tar, f"{key}.cls", str(label).encode("ascii"))
            _add(tar, f"{key}.jpg", data)  # raw bytes unless down-sized, whatever the format
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            keys.append(key)
            labels.append(label)
            formats[fmt] = formats.get(fmt, 0) + 1
            nbytes += len(data)
    return {"tar": tar_path, "keys": keys, "labels": labels, "bad": bad, "formats": formats, "bytes": nbytes,
            "resized": resized, "n_in": len(entries), "sha256": out.sha256.hexdigest()}


def _run_jobs(jobs: list, workers: int, desc: str):
    """Yield ``(index, result)`` of every job, in completion order, with a progress bar in images."""
    images = bar(total=sum(len(j[3]) for j in jobs), desc=desc, unit="img", file=sys.stderr, mininterval=1.0)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                check_stop()
                result = write_one_shard(job)
                images.update(result["n_in"])
                yield i, result
            return
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        # Workers ignore Ctrl-C (the terminal sends it to them too): the stage stops them when it stops.
        with ctx.Pool(min(workers, len(jobs)), initializer=signal.signal,
                      initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
            for i, result in pool.imap_unordered(_indexed, list(enumerate(jobs))):
                check_stop()  # leaving the block terminates the pool's processes
                images.update(result["n_in"])
                yield i, result
    finally:
        images.close()


def _indexed(item: tuple[int, Any]) -> tuple[int, dict[str, Any]]:
    return item[0], write_one_shard(item[1])


def resolve_workers(workers: int) -> int:
    """``0`` means one worker per available CPU core."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _bad_fraction_error(where: str, bad: list[Skipped], total: int, threshold: float) -> BadDataError:
    share = len(bad) / total
    examples = "\n  ".join(f"{s.relpath}: {s.reason}" for s in bad[:10])
    return BadDataError(
        f"{where}: {len(bad)} of {total} files ({100 * share:.2f} %) are unreadable, truncated or not images, "
        f"above data.max_bad_fraction = {threshold} ({100 * threshold:.2f} %). Fix or remove them, or raise "
        f"data.max_bad_fraction in params.yaml. First ones:\n  {examples}")


def write_shards(samples: list[Sample], out_dir: str | os.PathLike, *, dataset: str, domain: str,
                 classes: list[str], maxcount: int, seed: int, split: str = "all", workers: int = 1,
                 max_bad_fraction: float = 0.0, skipped: list[Skipped] = (), source: dict | None = None,
                 store_max_side: int | None = None) -> dict:
    """Write ``samples`` as ``out_dir/<split>-%06d.tar`` plus sizes.json and manifest.json; return the manifest.

    ``skipped``: files the importer already left out (counted towards ``max_bad_fraction``).
    ``workers``: processes (0 = one per core); the output does not depend on it.
    ``store_max_side``: ``None`` stores raw bytes; a number bounds each image's shorter side (module docstring).
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split {split!r} must be letters, digits or '_' (it names the shard files)")
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    if store_max_side is not None and (isinstance(store_max_side, bool) or not isinstance(store_max_side, int)
                                       or store_max_side < 1):
        raise ValueError(f"store_max_side must be null or an integer >= 1, got {store_max_side!r}")
    classes = check_classes(classes)
    where = f"{dataset}/{domain}"
    if not samples:
        raise ValueError(f"{where}: no images found" + (f" in {source}" if source else ""))
    for s in samples:
        if not 0 <= s.label < len(classes) or classes[s.label] != s.classname:
            raise ValueError(f"{where}: {s.relpath} has label {s.label} ({s.classname!r}), which does not match "
                             f"the class list ({len(classes)} classes)")
    items = sorted(samples, key=lambda s: s.relpath)
    keys = [sample_key(s.relpath) for s in items]
    if len(set(keys)) != len(keys):
        dupes = sorted({s.relpath for s, k in zip(items, keys) if keys.count(k) > 1})
        raise ValueError(f"{where}: these paths map to the same sample key (duplicates?): {dupes[:5]}")
    order = np.random.default_rng(seed).permutation(len(items))
    entries = [(keys[i], items[i].relpath, items[i].path, items[i].label, items[i].classname) for i in order]

    workers = resolve_workers(workers)
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        jobs = [(str(tmp / f"{split}-{i // maxcount:06d}.tar"), dataset, domain, entries[i:i + maxcount],
                 store_max_side)
                for i in range(0, len(entries), maxcount)]
        results = dict(_run_jobs(jobs, workers, desc=f"shards {where}/{split}"))
        bad = list(skipped) + [Skipped(p, r) for i in range(len(jobs)) for p, r in results[i]["bad"]]
        total = len(samples) + len(skipped)
        if len(bad) / total > max_bad_fraction:
            raise _bad_fraction_error(where, bad, total, max_bad_fraction)
        sizes, hashes, shard_keys, counts, formats, nbytes, resized = {}, {}, [], {c: 0 for c in classes}, {}, 0, 0
        for i in range(len(jobs)):
            r = results[i]
            name = Path(r["tar"]).name
            if not r["keys"]:  # every file of this chunk was bad
                os.unlink(r["tar"])
                continue
            sizes[name], hashes[name] = len(r["keys"]), r["sha256"]
            shard_keys += r["keys"]
            for label in r["labels"]:
                counts[classes[label]] += 1
            for fmt, n in r["formats"].items():
                formats[fmt] = formats.get(fmt, 0) + n
            nbytes += r["bytes"]
            resized += r["resized"]
        if not shard_keys:
            raise BadDataError(f"{where}: none of the {total} files is a readable image")
        manifest = {"dataset": dataset, "domain": domain, "split": split, "classes": classes, "counts": counts,
                    "n": len(shard_keys), "shards": list(sizes), "keys": shard_keys, "seed": seed,
                    # what every reader checks a shard against (pipeline.data.shards.shard_plan)
                    "shard_files": {name: {"n": n, "sha256": hashes[name]} for name, n in sizes.items()},
                    "maxcount": maxcount, "formats": dict(sorted(formats.items())), "source": source or {},
                    # the stored size every reader checks against its model's input size
                    "store_max_side": store_max_side, "jpeg_quality": JPEG_QUALITY, "n_resized": resized,
                    "n_skipped": len(bad), "skipped": [{"path": s.relpath, "reason": s.reason} for s in bad]}
        atomic_write_json(tmp / "sizes.json", sizes)
        atomic_write_json(tmp / "manifest.json", manifest)
    elapsed = max(time.perf_counter() - start, 1e-9)
    log.info("%s: wrote %d images (%.1f MB) in %d shard(s) to %s in %.1f s with %d worker(s): %.0f images/s, "
             "%.1f MB/s; %d file(s) skipped, %d down-sized",
             where, len(shard_keys), nbytes / 1e6, len(sizes), out_dir, elapsed,
             min(workers, len(jobs)), len(shard_keys) / elapsed, nbytes / 1e6 / elapsed, len(bad), resized)
    return manifest
