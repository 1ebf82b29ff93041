"""The reliability suite: one fault at a time injected into a copy of a finished smoke project.

Each fault asserts the exit status, that the one-line message names the key, file or value at fault, and
that the last good outputs are intact. Params, data and checkpoint faults run the stage in this process
through the same entry point as ``python -m stages.<name>`` (seconds each); signals, kills, resume and two
writers use real stage processes.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import copy_project, descendants, gone
from pipeline.command import entry
from pipeline.progress import clear_stop
from pipeline.smoke import dvc, smoke_env

pytestmark = pytest.mark.slow

STUDENTS = "models/students"


@pytest.fixture
def project(smoke_project, tmp_path):
    """The smoke workspace without its git repository and DVC cache: the faults run stages directly."""
    return copy_project(smoke_project, tmp_path / "project", light=True)


@pytest.fixture
def dvc_project(smoke_project, tmp_path):
    return copy_project(smoke_project, tmp_path / "project")


def digest(root: Path, *folders: str) -> str:
    """One hash over every file (path and bytes) under ``folders``: equal means untouched."""
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def edit_params(project: Path, edit) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run_in_process(project: Path, stage: str, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``python -m stages.<stage>`` in this process: (exit status, stderr)."""
    monkeypatch.chdir(project)
    module = importlib.import_module(f"stages.{stage}")
    capsys.readouterr()
    try:
        status = entry(stage, module.main, list(args))
    finally:
        clear_stop()
    err = capsys.readouterr().err
    if os.environ.get("UDA_DISTILL_FAULT_TABLE"):  # a table of faults: exit status, the message's first lines
        print(f"FAULT {stage} exit {status}: {' / '.join(err.splitlines()[:3])[:300]}", file=sys.__stdout__)
    return status, err


def stage_process(project: Path, stage: str, *args: str) -> subprocess.Popen:
    """The stage as `dvc repro` runs it in the smoke project: the same environment, hence the same torch
    thread count as the baseline run (another count changes float sums in the last bits)."""
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *args], cwd=project, env=smoke_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ------------------------------------------------------------------------------------------- params

def _set(path: str, value):
    def edit(params):
        node = params
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return edit


def _drop(path: str):
    def edit(params):
        node = params
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        del node[last]
    return edit


PARAM_FAULTS = {
    "lr zero": (_set("distill.lr", 0), r"distill\.lr: expected a number > 0"),
    "unknown top-level key": (_set("distil", {"epochs": 3}), r"distil"),
    "misspelt key": (_set("distill.epoch", 3), r"distill\.epoch"),
    "missing key": (_drop("distill.batch_size"), r"distill\.batch_size"),
    "wrong type": (_set("distill.epochs", "five"), r"distill\.epochs.*'five'"),
    "unknown method": (_set("distill.method", "kdd"), r"distill\.method.*'kdd'"),
    "unknown loss": (_set("distill.promptkd.loss.name", "kll"), r"distill\.promptkd\.loss\.name.*'kll'"),
    "unknown device policy": (_set("runtime.device", "tpu"), r"runtime\.device.*'tpu'"),
    "negative seed": (_set("seed", -1), r"seed.*-1"),
    "template without a slot": (_set("prompts.template", "a photo"), r"prompts\.template"),
    "task on an unknown domain": (_set("tasks.usps_to_mnist.target", "svhn"), r"svhn"),
    "collapse fraction zero": (_set("distill.collapse_fraction", 0), r"distill\.collapse_fraction"),
}


@pytest.mark.parametrize("fault", PARAM_FAULTS)
def test_params_fault_stops_before_any_output_changes(project, monkeypatch, capsys, fault):
    edit, message = PARAM_FAULTS[fault]
    before = digest(project, "models", "data/features", "results")
    edit_params(project, edit)
    status, err = run_in_process(project, "validate", monkeypatch, capsys)
    assert status == 1
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert digest(project, "models", "data/features", "results") == before


def test_params_file_not_utf8_or_not_yaml(project, monkeypatch, capsys):
    (project / "params.yaml").write_bytes(b"seed: 1\nname: caf\xe9\n")
    status, err = run_in_process(project, "validate", monkeypatch, capsys)
    assert status == 1 and "params.yaml: not UTF-8 text (byte 17" in err and "Traceback" not in err
    (project / "params.yaml").write_text("seed: [1\n")
    status, err = run_in_process(project, "validate", monkeypatch, capsys)
    assert status == 1 and "params.yaml: not valid YAML" in err


def test_missing_params_file(project, monkeypatch, capsys):
    status, err = run_in_process(project, "distill", monkeypatch, capsys, "--params", "nope.yaml")
    assert status == 1 and "params file nope.yaml not found" in err


@pytest.mark.parametrize("fault", ["lr zero", "unknown top-level key"])
def test_dvc_repro_stops_at_validate_and_keeps_the_outputs(dvc_project, fault):
    project = dvc_project
    edit, message = PARAM_FAULTS[fault]
    outputs = ("data/shards", "models/prompts", "data/features", STUDENTS, "results/evaluate", "results/report")
    before = digest(project, *outputs)
    edit_params(project, edit)
    with pytest.raises(RuntimeError) as info:
        dvc(["repro"], workdir=project)
    out = str(info.value)
    assert re.search(message, out) and "Running stage 'validate'" in out
    assert "Running stage 'distill'" not in out and "Running stage 'prompts'" not in out
    assert digest(project, *outputs) == before  # (validate's own constant output is re-made by the next run)


# --------------------------------------------------------------------------------------- data

def _first_shard(project: Path, domain: str = "mnist") -> Path:
    return sorted((project / "data" / "shards" / "digits" / domain).glob("*.tar"))[0]


def _truncate_at_member(tar_path: Path, keep: int) -> None:
    """Cut the tar after its first ``keep`` members (a 512-byte sample boundary, as a copy cut short)."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    cut = members[keep].offset
    with open(tar_path, "r+b") as fh:
        fh.truncate(cut)


def _append_member(tar_path: Path, name: str, data: bytes) -> None:
    raw = tar_path.read_bytes()
    with tarfile.open(fileobj=__import__("io").BytesIO(raw)) as tar:
        members = tar.getmembers()
    end = members[-1].offset_data + ((members[-1].size + 511) // 512) * 512
    import io
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tar_path.write_bytes(raw[:end] + buf.getvalue())


DATA_FAULTS = {
    "shard cut at a sample boundary": (
        lambda p: _truncate_at_member(_first_shard(p), keep=40), "features", r"00000\d\.tar"),
    "member appended to a shard": (
        lambda p: _append_member(_first_shard(p), "extra_sample.jpg", b"\xff\xd8not a jpeg"), "features",
        r"00000\d\.tar"),
    "shard manifest removed": (
        lambda p: (p / "data/shards/digits/mnist/manifest.json").unlink(), "features", r"manifest\.json"),
    "shard removed": (lambda p: _first_shard(p).unlink(), "features", r"00000\d\.tar"),
}


@pytest.mark.parametrize("fault", DATA_FAULTS)
def test_data_fault_names_the_file_and_keeps_outputs(project, monkeypatch, capsys, fault):
    damage, stage, message = DATA_FAULTS[fault]
    before = digest(project, "data/features", "models/students", "results")
    damage(project)
    status, err = run_in_process(project, stage, monkeypatch, capsys)
    assert status == 1, err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert digest(project, "data/features", "models/students", "results") == before


# --------------------------------------------------------------------------------- checkpoints

def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint" * 8}[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_corrupt_prompt_checkpoint_names_the_file(project, monkeypatch, capsys, how):
    checkpoint = next((project / "models" / "prompts").rglob("*.pt"))
    before = digest(project, "data/features")
    _corrupt(checkpoint, how)
    status, err = run_in_process(project, "features", monkeypatch, capsys)
    assert status == 1, err
    assert checkpoint.name in err and "weights_only=False" not in err and "Traceback" not in err
    assert digest(project, "data/features") == before


def test_corrupt_student_predictions_name_the_file(project, monkeypatch, capsys):
    predictions = project / STUDENTS / "usps_to_mnist" / "predictions.npy"
    before = digest(project, "results")
    _corrupt(predictions, "truncated")
    status, err = run_in_process(project, "evaluate", monkeypatch, capsys)
    assert status == 1, err
    assert "predictions.npy" in err and "Traceback" not in err
    assert digest(project, "results") == before


def test_corrupt_standin_weights_name_the_file(project, monkeypatch, capsys):
    weights = next(p for p in (project / "models" / "standins" / "teacher").iterdir()
                   if p.suffix in (".safetensors", ".bin", ".pt"))
    before = digest(project, "data/features")
    _corrupt(weights, "truncated")
    status, err = run_in_process(project, "features", monkeypatch, capsys)
    assert status == 1, err
    assert weights.name in err and "Traceback" not in err
    assert digest(project, "data/features") == before


def test_missing_teacher_weights_name_the_model(project, monkeypatch, capsys):
    edit_params(project, _set("model.teacher.name", "local-dir:models/standins/nowhere"))
    before = digest(project, "data/features")
    status, err = run_in_process(project, "features", monkeypatch, capsys)
    assert status == 1 and "models/standins/nowhere" in err and "Traceback" not in err
    assert digest(project, "data/features") == before


# --------------------------------------------------------------------------------- training guards

def test_divergence_is_one_message_and_keeps_outputs(project, monkeypatch, capsys):
    edit_params(project, _set("distill.lr", 1e30))
    before = digest(project, STUDENTS)
    status, err = run_in_process(project, "distill", monkeypatch, capsys)
    assert status == 1 and "diverged" in err and "Traceback" not in err
    assert "not run because of the failure: mnist_to_usps" in err  # fail fast: the second task never started
    assert digest(project, STUDENTS) == before


def test_collapse_is_one_message_and_keeps_outputs(project, monkeypatch, capsys):
    edit_params(project, _set("distill.collapse_fraction", 0.101))  # ten classes: any imbalance is "collapse"
    before = digest(project, STUDENTS)
    status, err = run_in_process(project, "distill", monkeypatch, capsys)
    assert status == 1 and "distill.collapse_fraction=0.101" in err and "Traceback" not in err
    assert digest(project, STUDENTS) == before


# ----------------------------------------------------------------------------- signals and writers

def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 300) -> str:
    """Read the process's output until a line matches ``pattern``; return what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(seen)[-3000:]}")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_within_seconds_and_leaves_nothing_behind(project, sig, status):
    before = digest(project, STUDENTS)
    proc = stage_process(project, "distill")
    _wait_for(proc, r"epoch 1/\d+ done")
    helpers = descendants(proc.pid)
    sent = time.monotonic()
    proc.send_signal(sig)
    out = proc.stdout.read()
    proc.wait(timeout=60)
    elapsed = time.monotonic() - sent
    print(f"{signal.Signals(sig).name}: exit {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode == status, out
    assert elapsed < 15, f"took {elapsed:.1f} s to stop"
    assert f"distill: interrupted ({signal.Signals(sig).name})" in out
    assert "Traceback" not in out
    assert gone(helpers), "a helper process (the temporary Prefect server?) outlived the stage"
    assert digest(project, STUDENTS) == before
    assert not list((project / "models").glob(".students.tmp-*"))


def test_a_second_writer_is_refused(project):
    first = stage_process(project, "distill")
    _wait_for(first, r"stage distill: params from")  # logged once the stage holds its lock
    second = stage_process(project, "distill")
    out = second.stdout.read()
    try:
        assert second.wait(timeout=120) == 1
        assert re.search(rf"stage distill is already running in this workspace \(pid {first.pid}", out), out
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------------------------------ resume

def _without_times(node):
    if isinstance(node, dict):
        return {k: _without_times(v) for k, v in node.items() if k != "seconds"}
    if isinstance(node, list):
        return [_without_times(v) for v in node]
    return node


def _same_value(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_outputs(a: Path, b: Path) -> None:
    """Every file under ``a`` equals the one under ``b``: bytes, JSON without wall-clock ``seconds``,
    checkpoints by value."""
    import torch

    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".json":
            same = _without_times(json.loads((a / rel).read_text())) == \
                _without_times(json.loads((b / rel).read_text()))
        elif rel.suffix == ".pt":
            same = _same_value(torch.load(a / rel, weights_only=True), torch.load(b / rel, weights_only=True))
        else:
            same = (a / rel).read_bytes() == (b / rel).read_bytes()
        assert same, f"{rel} differs from the uninterrupted run's"


@pytest.mark.parametrize("stage, kill_after, outputs", [
    ("distill", r"epoch 3/5 done", STUDENTS),
    ("prompts", r"epoch 8/20 done", "models/prompts"),
])
def test_kill_9_then_rerun_resumes_and_gives_identical_results(project, smoke_project, stage, kill_after, outputs):
    """No process outlives the kill; the re-run removes the killed run's temporaries and continues after its
    last completed epoch. The smoke project's own outputs are the uninterrupted run of the same code and
    params."""
    output = project / outputs
    leftovers = lambda: list(output.parent.glob(f".{output.name}.tmp-*"))  # noqa: E731
    proc = stage_process(project, stage)
    started = time.monotonic()
    _wait_for(proc, kill_after)
    helpers = descendants(proc.pid)
    proc.kill()
    proc.wait()
    killed_after = time.monotonic() - started
    assert gone(helpers), "a helper process (the temporary Prefect server?) outlived a kill -9 of its stage"
    assert leftovers()  # the killed writer's temporary output folder
    again = stage_process(project, stage)
    started = time.monotonic()
    out = again.stdout.read()
    assert again.wait() == 0, out
    print(f"{stage}: killed after {killed_after:.1f} s; the re-run took {time.monotonic() - started:.1f} s")
    assert re.search(r"resuming from .*resume-\w+\.pt after epoch \d+", out), out
    assert_same_outputs(output, smoke_project / outputs)
    assert not (project / "models" / "checkpoints" / stage).exists()  # the resume area went with success
    assert not leftovers()  # removed by the next run
