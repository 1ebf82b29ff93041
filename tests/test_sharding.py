"""The parallel shard writer: same bytes for any worker count, raw bytes passed through, bad files listed."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest

import fixture_trees as ft
import torch
from pipeline.data.benchmarks import dataset_classes, domain_samples
from pipeline.data.imagecheck import check_image
from pipeline.data.sharding import BadDataError, sample_key, write_shards
from pipeline.data.shards import image_loader, read_labels, read_manifest


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _write(name, ds, domain, out, **kw):
    classes = dataset_classes(name, ds)
    samples, skipped, source = domain_samples(name, ds, domain, classes)
    args = dict(dataset=name, domain=domain, classes=classes, maxcount=7, seed=0, skipped=skipped,
                source=source, max_bad_fraction=0.05)
    args.update(kw)
    return write_shards(samples, out, **args)


def test_image_check():
    rng = np.random.default_rng(0)
    assert check_image(ft.image_bytes(rng)) == ("jpeg", None)
    assert check_image(ft.image_bytes(rng, "PNG")) == ("png", None)
    assert check_image(b"")[1] == "empty file"
    assert "not an image" in check_image(b"<html>404</html>")[1]
    assert check_image(ft.corrupt_jpeg(rng))[1].startswith("unreadable jpeg")
    assert check_image(ft.truncated_jpeg(rng))[1].startswith("unreadable jpeg")
    png = ft.image_bytes(rng, "PNG")
    assert check_image(png[:-20])[1].startswith("unreadable png")
    assert check_image(ft.image_bytes(rng) + b"trailing bytes") == ("jpeg", None)  # decodes fine


def test_byte_identical_for_any_worker_count(tmp_path):
    ds = ft.office31(tmp_path / "o31", per_class=3)
    one = _write("office31", ds, "amazon", tmp_path / "w1", workers=1)
    two = _write("office31", ds, "amazon", tmp_path / "w2", workers=2)
    again = _write("office31", ds, "amazon", tmp_path / "w1b", workers=1)
    assert one == two == again and one["n"] == 93 and len(one["shards"]) == 14
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2") == _files(tmp_path / "w1b")


def test_bad_files_skipped_and_listed(tmp_path):
    ds = ft.office_home(tmp_path / "oh")
    m = _write("office_home", ds, "art", tmp_path / "out", workers=2)
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"Mug/broken.jpg", "Mug/half.jpg", "Pen/notes.txt"}
    assert reasons["Pen/notes.txt"].startswith("not an image file")
    assert reasons["Mug/half.jpg"].startswith("unreadable jpeg")
    assert m["n"] == 130 and m["n_skipped"] == 3 and m["counts"]["Mug"] == 2
    assert read_manifest(tmp_path / "out") == m
    keys, _ = read_labels(tmp_path / "out")
    assert sample_key("Mug/broken.jpg") not in keys and len(keys) == 130


def test_too_many_bad_files_fail_with_fraction_threshold_and_key(tmp_path):
    ds = ft.office_home(tmp_path / "oh")
    with pytest.raises(BadDataError) as err:
        _write("office_home", ds, "art", tmp_path / "out", max_bad_fraction=0.01)
    msg = str(err.value)
    assert "3 of 133 files (2.26 %)" in msg and "data.max_bad_fraction = 0.01" in msg and "Mug/half.jpg" in msg
    assert not (tmp_path / "out").exists()


def test_png_bytes_pass_through_and_decode_downstream(tmp_path):
    ds = ft.visda(tmp_path / "visda17")
    m = _write("visda", ds, "train", tmp_path / "out", workers=2)
    assert m["formats"] == {"png": 24}
    src = tmp_path / "visda17" / "train" / "aeroplane" / "img_01.png"
    key = sample_key("aeroplane/img_01.png")
    found = None
    for shard in m["shards"]:
        with tarfile.open(tmp_path / "out" / shard) as tar:
            names = tar.getnames()
            if f"{key}.jpg" in names:
                found = tar.extractfile(f"{key}.jpg").read()
    assert found == src.read_bytes()  # no re-encode

    def to_tensor(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)

    batches = list(image_loader(tmp_path / "out", transform=to_tensor, batch_size=10, shuffle=False,
                                with_labels=True))
    assert sum(len(b[0]) for b in batches) == 24 and batches[0][1].shape[1:] == (3, 8, 8)


def test_same_data_under_another_root_gives_the_same_shards(tmp_path):
    import shutil

    ds = ft.office31(tmp_path / "here", per_class=1)
    shutil.copytree(tmp_path / "here", tmp_path / "elsewhere" / "office31")
    a = _write("office31", ds, "webcam", tmp_path / "a")
    b = _write("office31", {**ds, "root": str(tmp_path / "elsewhere" / "office31")}, "webcam", tmp_path / "b")
    assert a == b and a["source"] == {"folder": "webcam/images"}
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


# ----------------------------------------------------------------------------------- stored size


def _sized_tree(root):
    """Two classes of photo-like images: JPEGs and PNGs above and at/below a 24-px shorter side."""
    rng = np.random.default_rng(3)
    sizes = {"a": [(60, 40, "JPEG"), (30, 90, "PNG"), (20, 70, "JPEG"), (24, 24, "JPEG")],
             "b": [(100, 50, "JPEG"), (50, 31, "PNG"), (25, 40, "JPEG"), (90, 10, "PNG")]}
    for cls, items in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h, fmt) in enumerate(items):
            (root / cls / f"img_{i}.{fmt.lower()}").write_bytes(ft.photo_bytes(rng, w, h, fmt))
    return ["a", "b"]


def _members(out):
    found = {}
    for shard in sorted(p for p in out.iterdir() if p.suffix == ".tar"):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    found[m.name[:-4]] = tar.extractfile(m).read()
    return found


def test_store_max_side_bounds_the_shorter_side_and_is_byte_identical_for_any_worker_count(tmp_path):
    import io

    from PIL import Image

    from pipeline.data.folders import list_class_tree
    from pipeline.data.sharding import JPEG_QUALITY

    classes = _sized_tree(tmp_path / "tree")
    samples, _ = list_class_tree(tmp_path / "tree", classes)
    outs = {}
    for name, workers in (("w1", 1), ("w2", 2), ("w1b", 1)):
        outs[name] = write_shards(samples, tmp_path / name, dataset="t", domain="d", classes=classes, maxcount=3,
                                  seed=0, workers=workers, store_max_side=24)
    assert outs["w1"] == outs["w2"] == outs["w1b"]
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2") == _files(tmp_path / "w1b")
    m = outs["w1"]
    assert m["store_max_side"] == 24 and m["jpeg_quality"] == JPEG_QUALITY == 95 and m["n_resized"] == 5
    stored = _members(tmp_path / "w1")
    for s in samples:
        raw = open(s.path, "rb").read()
        data = stored[sample_key(s.relpath)]
        with Image.open(io.BytesIO(raw)) as src, Image.open(io.BytesIO(data)) as img:
            (w, h), (sw, sh), src_fmt, fmt = src.size, img.size, src.format, img.format
        if min(w, h) <= 24:
            assert data == raw, s.relpath  # small enough: untouched bytes
            continue
        assert min(sw, sh) == 24 and abs(sw / sh - w / h) < 0.1, (s.relpath, (w, h), (sw, sh))
        assert fmt == ("PNG" if src_fmt == "PNG" else "JPEG"), s.relpath  # PNG stays lossless
    raw_m = write_shards(samples, tmp_path / "raw", dataset="t", domain="d", classes=classes, maxcount=3, seed=0)
    assert raw_m["store_max_side"] is None and raw_m["n_resized"] == 0
    assert all(stored_raw == open(s.path, "rb").read() for s in samples
               for stored_raw in [_members(tmp_path / "raw")[sample_key(s.relpath)]])


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "288"])
def test_store_max_side_rejects_bad_values(tmp_path, bad):
    classes = _sized_tree(tmp_path / "tree")
    from pipeline.data.folders import list_class_tree

    samples, _ = list_class_tree(tmp_path / "tree", classes)
    with pytest.raises(ValueError, match="store_max_side must be null or an integer >= 1"):
        write_shards(samples, tmp_path / "out", dataset="t", domain="d", classes=classes, maxcount=3, seed=0,
                     store_max_side=bad)


def test_smoke_sized_images_are_untouched_by_any_accepted_store_size(tmp_path):
    """The smoke digits are 32 px and its stand-ins need 32 px (37 with the cmkd view): shards stored with
    any value the stages accept hold the same tar files as raw-byte shards."""
    from pipeline.data.folders import list_class_tree

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "tree" / cls / f"{i}.png").write_bytes(ft.photo_bytes(rng, 32, 32, "PNG"))
    samples, _ = list_class_tree(tmp_path / "tree", ["a", "b"])
    kw = dict(dataset="digits", domain="mnist", classes=["a", "b"], maxcount=3, seed=0)
    write_shards(samples, tmp_path / "raw", **kw)
    raw = {k: v for k, v in _files(tmp_path / "raw").items() if k.endswith(".tar")}
    for side in (32, 37, 224, 288):
        m = write_shards(samples, tmp_path / f"s{side}", store_max_side=side, **kw)
        assert m["n_resized"] == 0
        assert {k: v for k, v in _files(tmp_path / f"s{side}").items() if k.endswith(".tar")} == raw
