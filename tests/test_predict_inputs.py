"""INPUT arguments of `uda-distill predict`: what each kind expands to, in which order, and how bad images
are reported instead of ending the run."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import pipeline  # noqa: F401  (torchvision guard first)
import torch
from PIL import Image

from pipeline.data.shards import shard_keys
from pipeline.student.inputs import Batch, Failure, InputError, Inputs


def _to_tensor(img: Image.Image) -> torch.Tensor:
    # Module level, not a lambda: loader workers start by forkserver and must unpickle it.
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def _image(path: Path, fmt: str = "PNG", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _run(args, batch_size=3, num_workers=0) -> list[Batch]:
    return list(Inputs.resolve(args).batches(transform=_to_tensor, batch_size=batch_size,
                                             num_workers=num_workers))


def _names(batches) -> list[str]:
    return [n for b in batches for n in b.names]


def _failures(batches) -> list[Failure]:
    return [f for b in batches for f in b.failures]


@pytest.fixture
def folder(tmp_path) -> Path:
    """images/: nested folders, mixed-case suffixes, a text file, hidden entries and a corrupt PNG."""
    root = tmp_path / "images"
    _image(root / "b.png")
    _image(root / "a.JPG", fmt="JPEG")
    _image(root / "sub" / "deeper" / "c.webp", fmt="WEBP")
    _image(root / "sub" / "a.bmp", fmt="BMP")
    _image(root / "sub.png")  # before everything in sub/: whole relative paths are sorted, and '.' < '/'
    _image(root / ".hidden.png")
    _image(root / ".cache" / "x.png")
    (root / "notes.txt").write_text("not an image\n")
    (root / "sub" / "broken.png").write_bytes(np.random.default_rng(1).bytes(64))
    return root


def test_folder_recursive_sorted_skips_hidden_and_non_images(folder):
    batches = _run([folder])
    top = str(folder)
    assert _names(batches) == [f"{top}/a.JPG", f"{top}/b.png", f"{top}/sub.png", f"{top}/sub/a.bmp",
                               f"{top}/sub/deeper/c.webp"]
    assert _failures(batches) == [Failure(f"{top}/sub/broken.png", "cannot identify image file")]
    assert all(b.images.shape == (len(b.names), 3, 8, 8) for b in batches)
    assert len(Inputs.resolve([folder])) == 6
    # The corrupt file is the 5th of 6 in sorted order: in the second batch of three, beside real images.
    assert [len(b.names) for b in batches] == [3, 2] and batches[1].failures
    assert _names(_run([f"{top}/"])) == _names(batches)  # a trailing slash changes no name


def test_batch_of_only_failures_is_yielded(tmp_path):
    good = _image(tmp_path / "good.png")
    bad = [tmp_path / "garbage.png", tmp_path / "truncated.png"]
    bad[0].write_bytes(b"garbage")
    bad[1].write_bytes(good.read_bytes()[:100])  # a valid header: it fails only when decoded
    batches = _run([*bad, good], batch_size=2)
    assert [b.names for b in batches] == [[], [str(good)]]
    assert [f.name for f in batches[0].failures] == [str(p) for p in bad]
    assert batches[0].images.shape[0] == 0
    assert batches[0].failures[0].reason == "cannot identify image file"
    assert batches[0].failures[1].reason.startswith("unreadable image (")


def test_list_file(tmp_path):
    _image(tmp_path / "imgs" / "one.png")
    _image(tmp_path / "imgs" / "two words.jpg", fmt="JPEG")
    elsewhere = _image(tmp_path / "abs" / "three.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "val.txt").write_text(
        "\ufeff# benchmark list: path label\n"
        "\n"
        "../imgs/one.png 3\n"
        "../imgs/two words.jpg 1\n"
        f"{elsewhere},7\n"
        "   # indented comment\n"
        "../imgs/gone.png 2\n")
    arg = os.path.join(str(lists), "val.txt")
    inputs = Inputs.resolve([arg])
    batches = _run([arg], batch_size=10)
    assert _names(batches) == [f"{lists}/../imgs/one.png", f"{lists}/../imgs/two words.jpg", str(elsewhere)]
    assert _failures(batches) == [Failure(f"{lists}/../imgs/gone.png", "no such file (val.txt:7)")]
    assert len(inputs) == 4


def test_single_file_picked_by_content(tmp_path):
    png_named_dat = _image(tmp_path / "photo.dat")  # no image suffix: still read, since it was named
    jpeg_named_txt = _image(tmp_path / "scan.txt", fmt="JPEG")  # a list suffix, but image bytes
    batches = _run([png_named_dat, jpeg_named_txt])
    assert _names(batches) == [str(png_named_dat), str(jpeg_named_txt)]
    assert batches[0].images.shape == (2, 3, 8, 8)
    text = tmp_path / "readme.md"
    text.write_text("hello")
    assert _failures(_run([text])) == [Failure(str(text), "cannot identify image file")]


def test_shard_folder(digits_shards):
    shard_dir = digits_shards["mnist"]
    keys = shard_keys(shard_dir)
    inputs = Inputs.resolve([shard_dir])
    batches = list(inputs.batches(transform=_to_tensor, batch_size=16))
    assert len(inputs) == len(keys)
    assert _names(batches) == [f"{shard_dir}::{k}" for k in keys]
    assert all(b.images.shape == (len(b.names), 3, 8, 8) and not b.failures for b in batches)


def test_mixed_arguments_keep_order(tmp_path, folder, digits_shards):
    single = _image(tmp_path / "single.png")
    listed = _image(tmp_path / "listed.png")
    (tmp_path / "list.lst").write_text("listed.png\nmissing.png\n")
    shard_dir = digits_shards["usps"]
    args = [single, shard_dir, tmp_path / "list.lst", folder, single]
    inputs = Inputs.resolve(args)
    batches = list(inputs.batches(transform=_to_tensor, batch_size=4))
    names = _names(batches)
    n_shard = len(shard_keys(shard_dir))
    assert names[0] == str(single) and names[-1] == str(single)
    assert names[1:1 + n_shard] == [f"{shard_dir}::{k}" for k in shard_keys(shard_dir)]
    assert names[1 + n_shard] == str(listed)
    assert names[2 + n_shard] == f"{folder}/a.JPG"
    assert [f.name for f in _failures(batches)] == [str(tmp_path / "missing.png"), f"{folder}/sub/broken.png"]
    # Everything is accounted for exactly once, and len() is that total.
    assert len(inputs) == len(names) + len(_failures(batches)) == 1 + n_shard + 2 + 6 + 1
    assert all(len(b.names) + len(b.failures) <= 4 for b in batches)
    assert all(b.names or b.failures for b in batches)


def test_workers_give_the_same_result(tmp_path, folder, digits_shards):
    # Small data: this starts loader processes.
    args = [folder, digits_shards["mnist"], _image(tmp_path / "last.png")]
    inline = _run(args, batch_size=4, num_workers=0)
    workers = _run(args, batch_size=4, num_workers=2)
    assert _names(workers) == _names(inline)
    assert _failures(workers) == _failures(inline)
    assert torch.equal(torch.cat([b.images for b in workers if b.names]),
                       torch.cat([b.images for b in inline if b.names]))


def test_missing_argument(tmp_path):
    with pytest.raises(InputError, match=r"predict input '.*nope/': no such file or folder; expected image"):
        Inputs.resolve([_image(tmp_path / "ok.png"), f"{tmp_path}/nope/"])


def test_folders_and_lists_without_images(tmp_path):
    empty = tmp_path / "empty"
    (empty / ".git").mkdir(parents=True)
    _image(empty / ".git" / "icon.png")
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(InputError, match=rf"predict input '{empty}': no image files in this folder"):
        Inputs.resolve([empty])
    comments = tmp_path / "only-comments.csv"
    comments.write_text("# nothing\n\n")
    with pytest.raises(InputError, match=r"only-comments.csv': the list file names no image"):
        Inputs.resolve([comments])


def test_parent_of_shard_folders_says_so(digits_shards):
    parent = digits_shards["mnist"].parent
    with pytest.raises(InputError, match=r"it holds shard folders \['mnist', 'usps'\]: pass those"):
        Inputs.resolve([parent])
