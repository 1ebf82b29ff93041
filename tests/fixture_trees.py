"""Tiny fixture trees in every layout DATASETS.md accepts, with the awkward cases real downloads have.

Each builder writes a few 8x8 images per class under ``root`` and returns the params entry
(``data.datasets.<name>``) that reads it. Images are deterministic (seeded pixels, fixed JPEG quality).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.classlists import load_classlist

# Subsets of the 345 DomainNet classes: capitalised folders and names with '-' included on purpose.
DOMAINNET_CLASSES = ["aircraft_carrier", "cello", "cell_phone", "The_Eiffel_Tower", "t-shirt", "zigzag"]
MINI_CLASSES = ["umbrella", "television", "zebra", "anvil"]  # split files number them in this order


def image_bytes(rng: np.random.Generator, fmt: str = "JPEG", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def photo_bytes(rng: np.random.Generator, width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A photo-like image: smooth colour gradients and blobs plus mild noise (JPEG quality 90).

    Random pixels have no low frequencies, so reduced-scale decoding and resizing behave unlike on photos;
    these do not.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.3)
        c = np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.1, 0.4) * min(width, height)
        c += 1.5 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        channels.append(c)
    img = np.stack(channels, axis=-1)
    img = (img - img.min()) / (img.max() - img.min() + 1e-6) * 235 + rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    kw = {"quality": 90} if fmt == "JPEG" else {}
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def corrupt_jpeg(rng: np.random.Generator) -> bytes:
    """A JPEG header followed by garbage (no decodable scan, no end marker)."""
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size=200, dtype=np.uint8).tobytes()


def truncated_jpeg(rng: np.random.Generator) -> bytes:
    data = image_bytes(rng, size=32)
    return data[: len(data) // 2]


def _put(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.name


def class_tree(domain_dir: Path, folders: list[str], per_class: int, rng: np.random.Generator,
               fmt: str = "JPEG") -> list[str]:
    """``domain_dir/<folder>/img_<i>.<ext>``; returns the relative paths written."""
    ext = ".png" if fmt == "PNG" else ".jpg"
    out = []
    for folder in folders:
        for i in range(per_class):
            name = f"img {i:02d}{ext}" if i == 0 else f"img_{i:02d}{ext}"  # a space in one file name
            _put(domain_dir / folder / name, image_bytes(rng, fmt))
            out.append(f"{folder}/{name}")
    return out


def office31(root: Path, *, layout: str = "official", per_class: int = 2, seed: int = 0,
             classes: list[str] | None = None, upper: bool = False) -> dict:
    """``official``: <domain>/images/<class>/ (PDA/CDU); ``dassl``: <domain>/<class>/. ``upper``: class
    folders in capitals (``BACK_PACK``), matched to the lower-case list by name."""
    rng = np.random.default_rng(seed)
    classes = classes or load_classlist("office31")
    for domain in ("amazon", "dslr", "webcam"):
        base = root / domain / "images" if layout == "official" else root / domain
        class_tree(base, [c.upper() if upper else c for c in classes], per_class, rng)
    if layout == "official":  # TLlib ships list files beside the domains; they must not confuse the tree
        _put(root / "image_list" / "amazon.txt", b"amazon/images/back_pack/frame_0001.jpg 0\n")
    return {"format": "office31", "root": str(root), "domains": ["amazon", "dslr", "webcam"]}


def office_home(root: Path, *, renamed: bool = False, per_class: int = 2, seed: int = 0,
                corrupt: bool = True) -> dict:
    """As distributed (``Art``, ..., ``Real World`` with a space) or Dassl-renamed (``real_world``).
    With ``corrupt``: one JPEG of garbage and one truncated JPEG in ``Art``, and a stray text file."""
    rng = np.random.default_rng(seed)
    folders = {"art": "Art", "clipart": "Clipart", "product": "Product", "real_world": "Real World"}
    classes = load_classlist("office_home")
    for domain, folder in folders.items():
        class_tree(root / (domain if renamed else folder), classes, per_class, rng)
    if corrupt:
        art = root / ("art" if renamed else "Art")
        _put(art / "Mug" / "broken.jpg", corrupt_jpeg(rng))
        _put(art / "Mug" / "half.jpg", truncated_jpeg(rng))
        _put(art / "Pen" / "notes.txt", b"not an image\n")
    return {"format": "office_home", "root": str(root), "domains": list(folders)}


def visda(root: Path, *, per_class: int = 2, seed: int = 0) -> dict:
    """``train/`` PNG renderings and ``validation/`` JPEG crops, each with ``image_list.txt``."""
    rng = np.random.default_rng(seed)
    classes = load_classlist("visda")
    for split, fmt in (("train", "PNG"), ("validation", "JPEG")):
        rel = class_tree(root / split, classes, per_class, rng, fmt=fmt)
        lines = [f"{p} {classes.index(p.split('/')[0])}" for p in rel]
        (root / split / "image_list.txt").write_text("\n".join(lines) + "\n")
    return {"format": "visda", "root": str(root), "domains": ["train", "validation"]}


def domainnet(root: Path, *, per_class: int = 2, seed: int = 0, split_dir: str | None = None,
              domains: tuple[str, ...] = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
              ) -> dict:
    """``<domain>/<class>/`` for a subset of the 345 classes; with ``split_dir`` also
    ``<split_dir>/<domain>_{train,test}.txt`` (ids = canonical DomainNet ids); t-shirt is left out of
    ``painting_train.txt`` as in the real files."""
    rng = np.random.default_rng(seed)
    canonical = load_classlist("domainnet")
    for domain in domains:
        rel = class_tree(root / domain, DOMAINNET_CLASSES, per_class, rng)
        if split_dir:
            lines = [(f"{domain}/{p}", canonical.index(p.split("/")[0])) for p in rel]
            train = [x for i, x in enumerate(lines) if i % 2 == 0]
            test = [x for i, x in enumerate(lines) if i % 2 == 1]
            if domain == "painting":
                test += [x for x in train if "/t-shirt/" in x[0]]
                train = [x for x in train if "/t-shirt/" not in x[0]]
            for name, part in (("train", train), ("test", test)):
                _put(root / split_dir / f"{domain}_{name}.txt", "".join(f"{p} {y}\n" for p, y in part).encode())
    entry = {"format": "domainnet", "root": str(root), "domains": list(domains), "allow_missing_classes": True}
    return entry


def mini_domainnet(root: Path, *, per_class: int = 2, seed: int = 0) -> dict:
    """Images as in DomainNet plus ``splits_mini/<domain>_{train,test}.txt`` numbering the classes in the
    file's own (non-alphabetical) order, paths relative to the root."""
    rng = np.random.default_rng(seed)
    for domain in ("clipart", "painting", "real", "sketch"):
        rel = class_tree(root / domain, MINI_CLASSES, per_class, rng)
        lines = [f"{domain}/{p} {MINI_CLASSES.index(p.split('/')[0])}\n" for p in rel]
        _put(root / "splits_mini" / f"{domain}_train.txt", "".join(lines[0::2]).encode())
        _put(root / "splits_mini" / f"{domain}_test.txt", "".join(lines[1::2]).encode())
    return {"format": "mini_domainnet", "root": str(root), "domains": ["clipart", "painting", "real", "sketch"]}


def generic_folder(root: Path, *, per_class: int = 2, seed: int = 0, empty_class: bool = True) -> dict:
    """Any class-per-folder tree: domain folders with spaces (mapped by ``folders``), upper-case class
    folders, a class list file of its own, and (``empty_class``) one class folder without images."""
    rng = np.random.default_rng(seed)
    classes = ["red_car", "blue_bike", "green_boat"]
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for folder in ("Studio Shots", "Street Photos"):
        class_tree(root / folder, ["RED_CAR", "Blue_Bike"] + ([] if empty_class else ["Green_Boat"]), per_class, rng)
        (root / folder / "Green_Boat").mkdir(exist_ok=True)
    return {"format": "folder", "root": str(root), "domains": ["studio", "street"],
            "folders": {"studio": "Studio Shots", "street": "Street Photos"}, "classes": str(root / "classes.txt"),
            "allow_missing_classes": empty_class}


def generic_image_list(root: Path, *, per_class: int = 2, seed: int = 0, bad_line: bool = False) -> dict:
    """Any ``relpath label`` lists (TLlib style: paths with spaces, labels = bundled class list ids).
    ``bad_line``: one line without a label."""
    rng = np.random.default_rng(seed)
    classes = load_classlist("visda")
    for domain in ("synthetic", "photos"):
        rel = class_tree(root / "images" / f"{domain} set", classes[:4], per_class, rng)
        lines = [f"images/{domain} set/{p} {classes.index(p.split('/')[0])}" for p in rel]
        if bad_line and domain == "photos":
            lines.insert(2, "images/photos set/knife/img_09.jpg")
        _put(root / "lists" / f"{domain}.txt", ("\n".join(lines) + "\n").encode())
    return {"format": "image_list", "root": str(root), "domains": ["synthetic", "photos"], "classes": "visda",
            "lists": {"synthetic": "lists/synthetic.txt", "photos": "lists/photos.txt"}}
