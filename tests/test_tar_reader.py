"""The shard tar reader against Python's tarfile, and what it refuses."""
from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.shards import ShardIntegrityError, image_loader, read_manifest
from pipeline.data.tar_reader import TarFormatError, tar_members, tar_samples


def _tarfile_members(path, suffixes):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile() and m.name.endswith(suffixes)]


def test_members_and_samples_match_tarfile(digits_shards):
    shard_dir = digits_shards["mnist"]
    for shard in read_manifest(shard_dir)["shards"]:
        path = shard_dir / shard
        for suffixes in ((".jpg", ".cls"), (".cls",), (".jpg", ".cls", ".json")):
            assert list(tar_members(path, suffixes)) == _tarfile_members(path, suffixes)
        samples = list(tar_samples(path, (".jpg", ".cls")))
        assert [s["__key__"] for s in samples] == [n[:-4] for n, _ in _tarfile_members(path, (".cls",))]
        assert all(set(s) == {"__key__", "jpg", "cls"} for s in samples)


def _tar(path, format, names=("a/0001.jpg", "a/0001.cls")):
    with tarfile.open(path, "w", format=format) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"xyz"))


def test_long_names_and_prefix(tmp_path):
    name = "d" * 120 + "/0001.jpg"  # over 100 bytes: ustar splits it into prefix + name
    _tar(tmp_path / "u.tar", tarfile.USTAR_FORMAT, names=(name,))
    assert list(tar_members(tmp_path / "u.tar", (".jpg",))) == [(name, b"xyz")]


@pytest.mark.parametrize("damage, message", [
    ("checksum", "bad header checksum at byte 0"),
    ("pax", "member type b'x'"),
    ("cut", "cut short"),
])
def test_refuses_what_the_shard_stage_does_not_write(tmp_path, damage, message):
    path = tmp_path / "s.tar"
    _tar(path, tarfile.PAX_FORMAT if damage == "pax" else tarfile.USTAR_FORMAT,
         names=("é" * 3 + "/0001.jpg",) if damage == "pax" else ("a/0001.jpg",))
    raw = bytearray(path.read_bytes())
    if damage == "checksum":
        raw[0] ^= 1
    if damage == "cut":
        raw = raw[:512 + 2]
    path.write_bytes(bytes(raw))
    with pytest.raises(TarFormatError, match=message):
        list(tar_members(path, (".jpg",)))


def test_a_damaged_shard_is_reported_as_such_by_the_loader(digits_shards, tmp_path):
    import shutil

    shard_dir = tmp_path / "mnist"
    shutil.copytree(digits_shards["mnist"], shard_dir)
    first = shard_dir / read_manifest(shard_dir)["shards"][0]
    with tarfile.open(first) as tar:
        offset = tar.getmembers()[4].offset  # the header of a later member
    raw = bytearray(first.read_bytes())
    raw[offset + 10] ^= 0xFF
    first.write_bytes(bytes(raw))
    with pytest.raises(ShardIntegrityError, match="bad header checksum.*dvc checkout"):
        list(image_loader(shard_dir, transform=lambda im: 0, batch_size=8, shuffle=False, with_labels=True))
