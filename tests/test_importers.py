"""Importers of every accepted layout, on generated fixture trees, and their error messages."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import fixture_trees as ft
from pipeline.data.benchmarks import dataset_classes, domain_samples, headline_metric, standard_tasks
from pipeline.data.classlists import load_classlist, prompt_name
from pipeline.data.imagelists import list_samples, read_image_list
from pipeline.data.samples import match_class


def _samples(name, ds, domain):
    classes = dataset_classes(name, ds)
    samples, skipped, _ = domain_samples(name, ds, domain, classes)
    return classes, samples, skipped


def test_canonical_class_lists():
    counts = {"office31": 31, "office_home": 65, "visda": 12, "domainnet": 345, "digits": 10}
    for name, n in counts.items():
        assert len(load_classlist(name)) == n, name
    dn = load_classlist("domainnet")
    assert dn.index("t-shirt") == 327 and dn.index("aircraft_carrier") == 0 and dn[-1] == "zigzag"
    oh = load_classlist("office_home")
    assert oh.index("TV") < oh.index("Table")  # Dassl's label order, kept as data (not re-sorted)
    assert prompt_name("The_Eiffel_Tower") == "the eiffel tower" and prompt_name("Alarm_Clock") == "alarm clock"


def test_match_class_is_explicit_not_by_sort():
    classes = ["The_Eiffel_Tower", "back_pack", "teddy-bear"]
    assert match_class("The_Eiffel_Tower", classes) == "The_Eiffel_Tower"
    assert match_class("the_eiffel_tower", classes) == "The_Eiffel_Tower"
    assert match_class("BACK_PACK", classes) == "back_pack"
    assert match_class("Back Pack", classes) == "back_pack"
    assert match_class("teddy_bear", classes) == "teddy-bear"
    assert match_class("bookcase", classes) is None


@pytest.mark.parametrize("layout, upper", [("official", False), ("dassl", False), ("dassl", True)])
def test_office31_layouts_give_the_same_samples(tmp_path, layout, upper):
    ref = ft.office31(tmp_path / "ref", layout="official")
    ds = ft.office31(tmp_path / "o31", layout=layout, upper=upper)
    _, a, _ = _samples("office31", ref, "dslr")
    classes, b, skipped = _samples("office31", ds, "dslr")
    assert len(b) == 62 and not skipped
    # Same relative paths (so the same sample keys) up to the folder's case, same labels.
    assert sorted((s.relpath.lower(), s.label) for s in a) == sorted((s.relpath.lower(), s.label) for s in b)
    assert {s.classname for s in b} == set(classes)


def test_office_home_distributed_and_renamed(tmp_path):
    for renamed in (False, True):
        ds = ft.office_home(tmp_path / str(renamed), renamed=renamed)
        classes, samples, skipped = _samples("office_home", ds, "real_world")
        assert len(samples) == 130 and len({s.label for s in samples}) == 65
        tv = next(s for s in samples if s.classname == "TV")
        assert tv.label == classes.index("TV") == 58
        _, art, skipped = _samples("office_home", ds, "art")
        assert [s.reason for s in skipped] == ["not an image file (suffix '.txt')"]
        assert len(art) == 132  # the two bad JPEGs are listed here, and rejected when sharded


def test_ambiguous_and_missing_domain_folders(tmp_path):
    ds = ft.office_home(tmp_path / "oh", corrupt=False)
    shutil.copytree(tmp_path / "oh" / "Real World", tmp_path / "oh" / "real_world")
    with pytest.raises(ValueError, match=r"several folders .* \['Real World', 'real_world'\]"):
        _samples("office_home", ds, "real_world")
    shutil.rmtree(tmp_path / "oh" / "Clipart")
    with pytest.raises(FileNotFoundError, match=r"no domain folder .*\['Clipart', 'clipart'\].*DATASETS.md"):
        _samples("office_home", ds, "clipart")


def test_missing_root_names_dataset_path_and_docs(tmp_path):
    ds = {"format": "visda", "root": str(tmp_path / "nowhere" / "visda17"), "domains": ["train", "validation"]}
    with pytest.raises(FileNotFoundError) as err:
        domain_samples("my_visda", ds, "train", load_classlist("visda"))
    msg = str(err.value)
    assert "data.datasets.my_visda.root" in msg and "nowhere/visda17" in msg and "DATASETS.md" in msg
    assert "VisDA-2017" in msg


def test_unknown_and_missing_class_folders(tmp_path):
    ds = ft.office31(tmp_path / "o31", layout="dassl")
    (tmp_path / "o31" / "amazon" / "skateboard").mkdir()
    with pytest.raises(ValueError, match=r"unknown class folder\(s\) \['skateboard'\].*back_pack"):
        _samples("office31", ds, "amazon")
    shutil.rmtree(tmp_path / "o31" / "webcam" / "mug")
    with pytest.raises(ValueError, match=r"without a folder: \['mug'\].*allow_missing_classes"):
        _samples("office31", ds, "webcam")
    _, samples, _ = _samples("office31", {**ds, "allow_missing_classes": True}, "webcam")
    assert "mug" not in {s.classname for s in samples}


def test_generic_folder_empty_class(tmp_path):
    ds = ft.generic_folder(tmp_path / "f")
    classes, samples, _ = _samples("mine", ds, "studio")
    assert classes == ["red_car", "blue_bike", "green_boat"]
    assert {s.classname for s in samples} == {"red_car", "blue_bike"}
    with pytest.raises(ValueError, match=r"class folder\(s\) without an image: \['green_boat'\]"):
        _samples("mine", {**ds, "allow_missing_classes": False}, "street")


def test_visda_lists_png_and_id_checks(tmp_path):
    ds = ft.visda(tmp_path / "visda17")
    classes, samples, _ = _samples("visda", ds, "train")
    assert len(samples) == 24 and samples[0].relpath.endswith(".png")
    assert headline_metric(ds) == "mean_class_acc" and headline_metric(ft.office31(tmp_path / "o")) == "acc"
    lst = tmp_path / "visda17" / "validation" / "image_list.txt"
    good = lst.read_text()
    lst.write_text(good.replace(" 0\n", " 3\n", 1))
    with pytest.raises(ValueError, match=r"image_list.txt:1: label 3 contradicts the class folder 'aeroplane'"):
        _samples("visda", ds, "validation")
    lst.write_text(good + "car/new.jpg 12\n")
    with pytest.raises(ValueError, match=r"image_list.txt:25: label 12 is out of range \[0, 11\]"):
        _samples("visda", ds, "validation")
    lst.write_text(good + "car/missing.jpg 3\n")
    with pytest.raises(FileNotFoundError, match=r"image_list.txt:25: car/missing.jpg"):
        _samples("visda", ds, "validation")


def test_domainnet_tree_and_split_files(tmp_path):
    ds = ft.domainnet(tmp_path / "dn", split_dir="splits", domains=("clipart", "painting"))
    classes, tree, _ = _samples("domainnet", ds, "painting")
    assert len(classes) == 345 and len(tree) == 12
    eiffel = next(s for s in tree if s.classname == "The_Eiffel_Tower")
    assert eiffel.label == classes.index("The_Eiffel_Tower")  # not shifted by a case-sensitive sort
    _, train, _ = _samples("domainnet", {**ds, "split": "train"}, "painting")
    _, test, _ = _samples("domainnet", {**ds, "split": "test"}, "painting")
    assert "t-shirt" not in {s.classname for s in train}  # as in the real painting_train.txt
    assert len(train) + len(test) == 12 and train[0].relpath.startswith("painting/")
    # TLlib keeps the same files in image_list/
    (tmp_path / "dn" / "splits").rename(tmp_path / "dn" / "image_list")
    assert len(_samples("domainnet", {**ds, "split": "all"}, "clipart")[1]) == 12


def test_mini_domainnet_classes_derived_and_ordered_canonically(tmp_path):
    ds = ft.mini_domainnet(tmp_path / "dn")
    classes, samples, _ = _samples("mini", ds, "sketch")
    canonical = load_classlist("domainnet")
    assert classes == sorted(ft.MINI_CLASSES, key=canonical.index) == ["anvil", "television", "umbrella", "zebra"]
    assert {(s.classname, s.label) for s in samples} == {(c, i) for i, c in enumerate(classes)}
    split = tmp_path / "dn" / "splits_mini" / "real_test.txt"
    split.write_text(split.read_text().replace(" 1\n", " 2\n", 1))  # television numbered like zebra
    with pytest.raises(ValueError, match=r"real_test.txt:\d+: label 2 .* contradicts line"):
        _samples("mini", ds, "real")


def test_image_list_bad_line_and_spaces(tmp_path):
    ds = ft.generic_image_list(tmp_path / "l")
    classes, samples, _ = _samples("lists", ds, "photos")
    assert len(samples) == 8 and " set/" in samples[0].relpath
    assert [s.classname for s in samples] == [classes[s.label] for s in samples]
    ds = ft.generic_image_list(tmp_path / "bad", bad_line=True)
    with pytest.raises(ValueError, match=r"photos.txt:3: expected '<relative image path> <integer label>'"):
        _samples("lists", ds, "photos")


def test_image_list_parsing(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("# comment\n\na b/c d.jpg 3\n")
    assert [(e.line, e.relpath, e.label) for e in read_image_list(f)] == [(3, "a b/c d.jpg", 3)]
    f.write_text("x.jpg 1\nx.jpg 1\n")
    with pytest.raises(ValueError, match="l.txt:2: 'x.jpg' is listed twice"):
        read_image_list(f)
    f.write_text("../x.jpg 1\n")
    with pytest.raises(ValueError, match="stay below the root"):
        read_image_list(f)
    f.write_text("x.jpg -1\n")
    with pytest.raises(ValueError, match=r"l.txt:1: label -1 is out of range"):
        list_samples(f, tmp_path, ["a", "b"])


def test_standard_tasks():
    expected = {"office31": 6, "office_home": 12, "visda": 1, "domainnet": 30, "mini_domainnet": 12}
    for fmt, n in expected.items():
        tasks = standard_tasks(fmt)
        assert len(tasks) == n and all(t["source"] != t["target"] for t in tasks.values())
    assert standard_tasks("visda") == {"train_to_validation": {"dataset": "visda", "source": "train",
                                                               "target": "validation"}}


def test_image_list_with_folder_labels_accepts_the_files_own_numbering(tmp_path):
    # TLlib numbers Office-Home classes its own way (Drill is 0 there, not in the bundled list)
    rng = np.random.default_rng(0)
    rel = ft.class_tree(tmp_path / "oh" / "Art", ["Drill", "Alarm_Clock", "Backpack"], 2, rng)
    tllib = {"Drill": 0, "Alarm_Clock": 1, "Backpack": 2}
    lines = [f"Art/{p} {tllib[p.split('/')[0]]}" for p in rel]
    (tmp_path / "oh" / "image_list").mkdir()
    (tmp_path / "oh" / "image_list" / "Art.txt").write_text("\n".join(lines) + "\n")
    ds = {"format": "image_list", "root": str(tmp_path / "oh"), "classes": "office_home", "domains": ["art"],
          "lists": {"art": "image_list/Art.txt"}, "labels": "folder"}
    classes, samples, _ = _samples("tllib", ds, "art")
    assert len(samples) == 6
    assert {(s.classname, s.label) for s in samples} == {(c, classes.index(c)) for c in tllib}
    # still one number per class: a second number for Drill is an error naming the line
    lines[1] = lines[1].rsplit(" ", 1)[0] + " 1"
    (tmp_path / "oh" / "image_list" / "Art.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"Art.txt:2: label 1 for class folder 'Drill' contradicts line"):
        _samples("tllib", ds, "art")


def test_byte_order_mark_is_not_part_of_a_class_or_a_path(tmp_path):
    ds = ft.generic_image_list(tmp_path / "l")
    names = load_classlist("visda")[:4]
    (tmp_path / "classes.txt").write_bytes("\n".join(names).encode("utf-8-sig"))
    lst = tmp_path / "l" / "lists" / "photos.txt"
    lst.write_bytes(lst.read_text(encoding="utf-8").encode("utf-8-sig"))
    classes, samples, _ = _samples("lists", {**ds, "classes": str(tmp_path / "classes.txt")}, "photos")
    assert classes == names and classes[0] == "aeroplane"
    assert len(samples) == 8 and not samples[0].relpath.startswith("\ufeff")
