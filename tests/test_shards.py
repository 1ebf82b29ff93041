"""Shards of image-folder domains: determinism, content, errors, and the loaders that read them."""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

import pipeline  # noqa: F401  (torchvision guard first)
import torch
from PIL import Image

from pipeline.data import sharding, shards
from pipeline.data.shards import (folder_dataset, image_loader, read_labels, read_manifest,
                                  write_domain_shards)

CLASSES = ["zebra", "apple", "mango"]  # deliberately not sorted: labels follow this list


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def _make_tree(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for classname, n in per_class.items():
        (root / classname).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / classname / f"img_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _make_tree(tmp_path / "images", {"zebra": 5, "apple": 4, "mango": 3})


def _write(tree: Path, out: Path, **kw) -> dict:
    args = dict(dataset="toy", domain="d1", classes=CLASSES, maxcount=5, seed=0)
    args.update(kw)
    return write_domain_shards(tree, out, **args)


def _all_batches(loader) -> list[tuple]:
    return list(loader)


def test_rerun_is_byte_identical(tree, tmp_path):
    m1 = _write(tree, tmp_path / "a")
    m2 = _write(tree, tmp_path / "b")
    assert m1 == m2
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # Re-running into the same folder replaces it with identical content.
    before = {n: (tmp_path / "a" / n).read_bytes() for n in names}
    _write(tree, tmp_path / "a")
    assert {n: (tmp_path / "a" / n).read_bytes() for n in names} == before


def test_seed_changes_order_not_content(tree, tmp_path):
    m0 = _write(tree, tmp_path / "s0", seed=0)
    m1 = _write(tree, tmp_path / "s1", seed=1)
    assert m0["keys"] != m1["keys"]
    assert sorted(m0["keys"]) == sorted(m1["keys"])


def test_sample_content(tmp_path):
    tree = _make_tree(tmp_path / "images", {"zebra": 1, "apple": 1, "mango": 1})
    # A stem with dots, and a PNG that must be stored as-is under the `jpg` extension.
    Image.new("RGB", (5, 5), (1, 2, 3)).save(tree / "apple" / "v1.2.final.png")
    m = _write(tree, tmp_path / "out", dataset="toy", domain="d1")
    assert m["classes"] == CLASSES
    key = shards.sample_key("apple/v1.2.final.png")
    assert key in m["keys"] and "apple" not in key and "." not in key  # opaque: no class, no extension

    members = {}
    for shard in m["shards"]:
        with tarfile.open(tmp_path / "out" / shard) as tar:
            for info in tar:
                assert info.mtime == 0 and info.uname == sharding.TAR_USER
                members[info.name] = tar.extractfile(info).read()
    assert len(members) == 3 * m["n"]

    assert members[f"{key}.jpg"] == (tree / "apple" / "v1.2.final.png").read_bytes()
    assert members[f"{key}.cls"] == b"1"  # index in CLASSES, not in sorted order
    assert json.loads(members[f"{key}.json"]) == {
        "path": "apple/v1.2.final.png", "dataset": "toy", "domain": "d1", "classname": "apple", "format": "png"}
    zebra = shards.sample_key("zebra/img_000.jpg")
    assert members[f"{zebra}.cls"] == b"0"
    assert members[f"{zebra}.jpg"] == (tree / "zebra" / "img_000.jpg").read_bytes()


def test_counts_sizes_and_maxcount(tmp_path):
    tree = _make_tree(tmp_path / "images", {"zebra": 7, "apple": 5})  # no mango folder
    with pytest.raises(ValueError, match="mango"):
        _write(tree, tmp_path / "out")
    m = _write(tree, tmp_path / "out", maxcount=4, split="train", allow_missing_classes=True)
    assert m["counts"] == {"zebra": 7, "apple": 5, "mango": 0}
    assert m["n"] == 12 and m["split"] == "train"
    assert m["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {s: 4 for s in m["shards"]}
    assert read_manifest(tmp_path / "out") == m
    # The seeded shuffle mixes classes: the first shard is not a single-class run.
    _, labels = read_labels(tmp_path / "out")
    assert all(len(set(labels[i:i + 4].tolist())) > 1 for i in (0, 4, 8))


def test_unknown_class_folder_names_it(tree, tmp_path):
    (tree / "kiwi").mkdir()
    with pytest.raises(ValueError, match="kiwi") as err:
        _write(tree, tmp_path / "out")
    assert "zebra" in str(err.value)  # the expected names are listed too
    assert not (tmp_path / "out").exists()


def test_read_manifest_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard stage"):
        read_manifest(tmp_path / "nowhere")


def test_eval_loader_order_labels_and_partial_batch(tree, tmp_path):
    m = _write(tree, tmp_path / "out")
    loader = image_loader(tmp_path / "out", transform=_to_tensor, batch_size=5, shuffle=False,
                          with_labels=True)
    batches = _all_batches(loader)
    assert [len(b[0]) for b in batches] == [5, 5, 2] and len(loader) == 3
    keys = [k for b in batches for k in b[0]]
    labels = torch.cat([b[2] for b in batches])
    assert keys == m["keys"]
    assert batches[0][1].shape == (5, 3, 8, 8) and batches[0][1].dtype == torch.float32
    assert labels.dtype == torch.long

    rkeys, rlabels = read_labels(tmp_path / "out")
    assert rkeys == keys and rlabels.tolist() == labels.tolist()
    by_key = {shards.sample_key(f"{c}/{p.name}"): CLASSES.index(c)
              for c in CLASSES for p in (tmp_path / "images" / c).iterdir()}
    assert [by_key[k] for k in rkeys] == rlabels.tolist()


def _corrupt_cls(shard_dir: Path) -> None:
    """Rewrite every shard with garbage ``.cls`` bytes."""
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            entries = [(info, tar.extractfile(info).read()) for info in tar]
        with tarfile.open(tar_path, "w") as tar:
            for info, data in entries:
                if info.name.endswith(".cls"):
                    data = b"\xff not a label \x00"
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_unlabelled_loader_never_reads_labels(tree, tmp_path):
    m = _write(tree, tmp_path / "out")
    _corrupt_cls(tmp_path / "out")
    with pytest.raises(ValueError, match="invalid literal"):  # the labelled loader does read them
        _all_batches(image_loader(tmp_path / "out", transform=_to_tensor, batch_size=4, shuffle=False,
                                  with_labels=True))
    for shuffle in (False, True):
        batches = _all_batches(image_loader(tmp_path / "out", transform=_to_tensor, batch_size=4,
                                            shuffle=shuffle, with_labels=False))
        assert all(len(b) == 2 for b in batches)
        assert sorted(k for b in batches for k in b[0]) == sorted(m["keys"])


def _shuffled_keys(shard_dir, *, seed, epoch, num_workers=0) -> list[str]:
    loader = image_loader(shard_dir, transform=_to_tensor, batch_size=3, shuffle=True, seed=seed,
                          epoch=epoch, with_labels=False, num_workers=num_workers)
    batches = _all_batches(loader)
    assert len(batches) == len(loader)
    return [k for b in batches for k in b[0]]


def test_shuffle_deterministic_per_seed_and_epoch(tmp_path):
    tree = _make_tree(tmp_path / "images", {"zebra": 12, "apple": 12, "mango": 12})
    m = _write(tree, tmp_path / "out", maxcount=6)
    a = _shuffled_keys(tmp_path / "out", seed=3, epoch=0)
    assert a == _shuffled_keys(tmp_path / "out", seed=3, epoch=0)
    assert sorted(a) == sorted(m["keys"]) and a != m["keys"]
    b = _shuffled_keys(tmp_path / "out", seed=3, epoch=1)
    assert sorted(b) == sorted(a) and b != a
    assert _shuffled_keys(tmp_path / "out", seed=4, epoch=0) != a
    # Workers split shards, they do not duplicate samples; the batch count still matches len().
    w = _shuffled_keys(tmp_path / "out", seed=3, epoch=0, num_workers=2)
    assert sorted(w) == sorted(m["keys"])


def test_folder_dataset_matches_shards(tree, tmp_path):
    _write(tree, tmp_path / "out")
    ds = folder_dataset(tree, classes=CLASSES, transform=_to_tensor)
    by_key = {key: (img, lab) for key, img, lab in (ds[i] for i in range(len(ds)))}
    for keys, images, labels in image_loader(tmp_path / "out", transform=_to_tensor, batch_size=4,
                                             shuffle=False, with_labels=True):
        for key, image, label in zip(keys, images, labels):
            assert by_key[key][1] == int(label)
            assert torch.equal(by_key[key][0], image)  # same bytes, same decode, same transform


def test_interrupted_write_leaves_nothing(tree, tmp_path, monkeypatch):
    out = tmp_path / "shards" / "out"
    calls = {"n": 0}
    real_add = sharding._add

    def failing_add(tar, name, data):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("simulated crash")
        return real_add(tar, name, data)

    monkeypatch.setattr(sharding, "_add", failing_add)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _write(tree, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary folder left either

    # A crash while rewriting keeps the previous good output intact.
    monkeypatch.setattr(sharding, "_add", real_add)
    good = _write(tree, out)
    calls["n"] = 0
    monkeypatch.setattr(sharding, "_add", failing_add)
    with pytest.raises(RuntimeError):
        _write(tree, out, seed=9)
    assert read_manifest(out) == good
    assert [p.name for p in out.parent.iterdir()] == ["out"]


# ----------------------------------------------------------------------------------------- seeded views


def _noisy(img: Image.Image) -> torch.Tensor:
    """A random 'augmentation' drawing from torch's default CPU generator, which the loader seeds."""
    noise = float(torch.rand(()))
    return _to_tensor(img) + noise


def _view_batches(shard_dir, *, views, seed=0, epoch=0, num_workers=0, shuffle=True) -> dict:
    """{key: image tensor, or tuple of view tensors} over one pass of a views loader."""
    out = {}
    loader = image_loader(shard_dir, views=views, batch_size=3, shuffle=shuffle, seed=seed, epoch=epoch,
                          with_labels=False, num_workers=num_workers)
    for keys, images in loader:
        for i, key in enumerate(keys):
            out[key] = tuple(v[i] for v in images) if isinstance(images, tuple) else images[i]
    return out


def test_views_are_seeded_per_key(tree, tmp_path):
    m = _write(tree, tmp_path / "out")
    a = _view_batches(tmp_path / "out", views=(_noisy,), seed=3, epoch=0)
    assert sorted(a) == sorted(m["keys"]) and all(t.shape == (3, 8, 8) for t in a.values())
    # Same (seed, epoch): same tensors, whatever the order (shuffled or not) and the caller's RNG state.
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    b = _view_batches(tmp_path / "out", views=(_noisy,), seed=3, epoch=0, shuffle=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Another epoch or seed: other draws for every sample.
    for other in (_view_batches(tmp_path / "out", views=(_noisy,), seed=3, epoch=1),
                  _view_batches(tmp_path / "out", views=(_noisy,), seed=4, epoch=0)):
        assert not any(torch.equal(a[k], other[k]) for k in a)
    # Each sample gets its own draw (not one seed per run or per batch).
    plain = {k: img for keys, images in image_loader(tmp_path / "out", transform=_to_tensor, batch_size=3,
                                                     shuffle=False, with_labels=False)
             for k, img in zip(keys, images)}
    assert len({round(float((a[k] - plain[k]).mean()), 5) for k in a}) == len(a)


def test_views_same_for_any_worker_count(tmp_path):
    tree = _make_tree(tmp_path / "images", {"zebra": 4, "apple": 4, "mango": 4})
    m = _write(tree, tmp_path / "out", maxcount=4)  # 3 shards, so 2 workers both read
    a = _view_batches(tmp_path / "out", views=(_noisy, _noisy), seed=1, epoch=2)
    w = _view_batches(tmp_path / "out", views=(_noisy, _noisy), seed=1, epoch=2, num_workers=2)
    assert sorted(a) == sorted(w) == sorted(m["keys"])
    for key in a:
        assert all(torch.equal(x, y) for x, y in zip(a[key], w[key]))
        assert not torch.equal(a[key][0], a[key][1])  # the two views draw independently


def test_two_views_batch_layout_and_rng_untouched(tree, tmp_path):
    m = _write(tree, tmp_path / "out")
    common = dict(batch_size=5, shuffle=False, with_labels=True)
    # The caller's generators are restored after each seeded transform: they end as after an eval pass
    # (torch's DataLoader itself draws a base seed from the torch generator on every pass).
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    eval_batches = _all_batches(image_loader(tmp_path / "out", transform=_to_tensor, **common))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    loader = image_loader(tmp_path / "out", views=(_noisy, _to_tensor), **common)
    batches = _all_batches(loader)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert len(batches) == len(loader) == 3
    keys = [k for b in batches for k in b[0]]
    assert keys == m["keys"]
    for keys, views, labels in batches:
        assert isinstance(views, tuple) and len(views) == 2
        weak, plain = views
        assert weak.shape == plain.shape == (len(keys), 3, 8, 8) and labels.dtype == torch.long
        assert not torch.equal(weak, plain)
    for (_, (_, plain), labels), (_, images, eval_labels) in zip(batches, eval_batches):
        assert torch.equal(plain, images) and torch.equal(labels, eval_labels)


def test_loader_needs_transform_or_views(tree, tmp_path):
    _write(tree, tmp_path / "out")
    common = dict(batch_size=2, shuffle=False, with_labels=False)
    with pytest.raises(ValueError, match="exactly one"):
        image_loader(tmp_path / "out", **common)
    with pytest.raises(ValueError, match="exactly one"):
        image_loader(tmp_path / "out", transform=_to_tensor, views=(_to_tensor,), **common)
    with pytest.raises(ValueError, match="non-empty"):
        image_loader(tmp_path / "out", views=(), **common)


# ----------------------------------------------------------------------------------------- integrity


def test_manifest_records_count_and_hash_per_shard(tree, tmp_path):
    import hashlib

    m = _write(tree, tmp_path / "out")
    assert list(m["shard_files"]) == m["shards"]
    for name, info in m["shard_files"].items():
        assert info["sha256"] == hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest()
    assert [info["n"] for info in m["shard_files"].values()] == [5, 5, 2]


def _samples_of(tar_path: Path) -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """The members of a shard grouped per sample (consecutive members with one key), in tar order."""
    groups: list = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key = member.name.split(".")[0]
            if not groups or groups[-1][0][0].name.split(".")[0] != key:
                groups.append([])
            groups[-1].append((member, tar.extractfile(member).read()))
    return groups


def _rewrite(tar_path: Path, groups: list) -> None:
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for group in groups:
            for member, data in group:
                tar.addfile(member, io.BytesIO(data))


def _truncate_last_sample(tar_path: Path) -> None:
    # Cut at the header of the last sample's first member: a 512-byte boundary that tar readers accept.
    cut = _samples_of(tar_path)[-1][0][0].offset
    assert cut % 512 == 0
    tar_path.write_bytes(tar_path.read_bytes()[:cut])


def _append_sample(tar_path: Path) -> None:
    groups = _samples_of(tar_path)
    new = [(tarfile.TarInfo("f" * 20 + member.name[20:]), data) for member, data in groups[0]]
    for info, data in new:
        info.size = len(data)
    _rewrite(tar_path, groups + [new])


def _swap_first_two(tar_path: Path) -> None:
    groups = _samples_of(tar_path)
    _rewrite(tar_path, [groups[1], groups[0], *groups[2:]])


FAULTS = {  # fault -> what the message must say (shard 0 holds 5 samples)
    "truncated": (_truncate_last_sample, "found 4 samples, expected 5"),
    "appended": (_append_sample, "sample 6 has key 'ffffffffffffffffffff', the manifest lists only 5"),
    "reordered": (_swap_first_two, "sample 1 has key"),
}


def _faulty_shards(tree: Path, out: Path, fault: str) -> tuple[Path, dict]:
    m = _write(tree, out)
    FAULTS[fault][0](out / m["shards"][0])
    return out / m["shards"][0], m


@pytest.mark.parametrize("fault", list(FAULTS))
def test_read_labels_stops_on_a_shard_that_does_not_match_the_manifest(tree, tmp_path, fault):
    shard, m = _faulty_shards(tree, tmp_path / "out", fault)
    with pytest.raises(shards.ShardIntegrityError) as err:
        read_labels(tmp_path / "out")
    message = str(err.value)
    assert str(shard) in message and FAULTS[fault][1] in message
    assert "dvc checkout" in message and "dvc repro -f -s shard" in message
    if fault == "reordered":
        assert f"expected {m['keys'][0]!r}" in message


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_loader_stops_on_a_shard_that_does_not_match_the_manifest(tree, tmp_path, fault, num_workers):
    shard, _ = _faulty_shards(tree, tmp_path / "out", fault)
    for with_labels, shuffle in ((False, False), (True, True)):
        loader = image_loader(tmp_path / "out", transform=_to_tensor, batch_size=2, shuffle=shuffle,
                              with_labels=with_labels, num_workers=num_workers)
        # a worker's exception reaches the caller with its type and the original message inside
        with pytest.raises(shards.ShardIntegrityError) as err:
            _all_batches(loader)
        assert str(shard) in str(err.value) and FAULTS[fault][1] in str(err.value)


def test_old_manifest_without_shard_files_is_refused(tree, tmp_path):
    m = _write(tree, tmp_path / "out")
    del m["shard_files"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(m))
    for read in (read_labels, lambda d: image_loader(d, transform=_to_tensor, batch_size=2, shuffle=False,
                                                     with_labels=False)):
        with pytest.raises(shards.ShardIntegrityError, match="older version.*dvc repro -f -s shard"):
            read(tmp_path / "out")
