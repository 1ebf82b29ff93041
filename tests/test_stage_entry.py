"""What a stage command does when things go wrong: exit status, one-line messages, locks, leftovers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.io import atomic_dir, atomic_write_text, remove_stale_temporaries
from pipeline.orchestration.flows import StageError
from conftest import descendants, gone
from pipeline.command import entry
from pipeline.orchestration.stage import _lock_stage
from pipeline.progress import Cancelled, clear_stop, stop_requested


def _raiser(exc: BaseException):
    def main(argv):
        raise exc
    return main


def test_expected_error_is_one_line_without_traceback(capsys, monkeypatch):
    monkeypatch.delenv("UDA_DISTILL_DEBUG", raising=False)
    assert entry("distill", _raiser(ConfigError("params.yaml is invalid:\n  distill.lr: expected > 0")), []) == 1
    err = capsys.readouterr().err
    assert err.startswith("distill: error: params.yaml is invalid:\n  distill.lr: expected > 0")
    assert "Traceback" not in err and "--debug" in err


def test_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("UDA_DISTILL_DEBUG", raising=False)
    assert entry("distill", _raiser(ValueError("bad shard")), ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("UDA_DISTILL_DEBUG", "1")
    assert entry("distill", _raiser(ValueError("bad shard")), []) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_defect_always_shows_its_traceback(capsys):
    assert entry("features", _raiser(TypeError("unsupported operand")), []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "a defect" in err


def test_item_failures_are_listed_per_item(capsys):
    exc = StageError("distill", {"usps_to_mnist": ValueError("shard 000001.tar: expected 25 samples, found 20")},
                     ["mnist_to_usps"])
    assert entry("distill", _raiser(exc), []) == 1
    err = capsys.readouterr().err
    assert "item usps_to_mnist: shard 000001.tar: expected 25 samples, found 20" in err
    assert "not run because of the failure: mnist_to_usps" in err and "Traceback" not in err


def test_interrupt_exits_130_and_says_what_was_kept(capsys):
    try:
        assert entry("distill", _raiser(KeyboardInterrupt()), []) == 130
        assert stop_requested()  # running items stop at their next step
        assert entry("distill", _raiser(Cancelled("stopped")), []) == 130
    finally:
        clear_stop()
    err = capsys.readouterr().err
    assert "distill: interrupted (SIGINT)" in err and "paths.checkpoints" in err


def test_a_second_writer_of_a_stage_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.orchestration.stage import _lock_stage\n"
        "_lock_stage('distill', Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)"),
        str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"stage distill is already running .*pid {holder.pid}"):
            _lock_stage("distill", tmp_path)
    finally:
        holder.kill()
        holder.wait()
    _lock_stage("distill", tmp_path)  # the kernel released the lock with the process


def test_leftovers_of_a_killed_writer_are_removed_and_a_live_writers_kept(tmp_path):
    out = tmp_path / "students"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_dir = tmp_path / f".students.tmp-{dead}-abc"
    (stale_dir / "task").mkdir(parents=True)
    stale_old = tmp_path / f".students.old-{dead}"
    stale_old.mkdir()
    live = tmp_path / f".students.tmp-{os.getpid()}-xyz"
    live.mkdir()
    other = tmp_path / f".studentsX.tmp-{dead}-abc"
    other.mkdir()
    assert sorted(remove_stale_temporaries(out)) == sorted([stale_dir, stale_old])
    assert live.is_dir() and other.is_dir() and not stale_dir.exists()
    with atomic_dir(out) as tmp:  # an atomic write cleans up first, too
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"


def test_outputs_are_readable_as_the_umask_says(tmp_path, monkeypatch):
    import pipeline.io

    monkeypatch.setattr(pipeline.io, "_UMASK", 0o022)  # the process's umask, read at import
    with atomic_dir(tmp_path / "out") as tmp:
        atomic_write_text(tmp / "f.json", "{}")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "f.json").stat().st_mode & 0o777 == 0o644


def test_safetensors_files_follow_the_umask(tmp_path, monkeypatch):
    """safetensors writes through a 0600 temporary: model folders and residuals get the usual mode."""
    import torch

    import pipeline.io
    from pipeline.models.factory import ModelSpec, load_model, save_local_dir
    from pipeline.models.residual import save_residual

    monkeypatch.setattr(pipeline.io, "_UMASK", 0o022)
    model = load_model(ModelSpec(name="digits-vit-student", pretrained="random"))
    save_local_dir(model.model, {"embed_dim": 32}, tmp_path / "model")
    assert (tmp_path / "model" / "open_clip_model.safetensors").stat().st_mode & 0o777 == 0o644
    weights = {"w": torch.zeros(3)}
    save_residual(tmp_path / "residual.safetensors", trained=weights, base=weights, identity=model.identity)
    assert (tmp_path / "residual.safetensors").stat().st_mode & 0o777 == 0o644


def test_params_that_are_not_utf8_or_carry_a_bom(tmp_path):
    from pipeline.config import load_params

    bad = tmp_path / "params.yaml"
    bad.write_bytes(b"seed: 1\nname: \xff\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not UTF-8 text \(byte 14 is b"):
        load_params(bad)
    project = Path(__file__).resolve().parent.parent
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + (project / "params.yaml").read_bytes())
    assert load_params(bom)["seed"] == load_params(project / "params.yaml")["seed"]


def test_learning_rates_must_be_positive():
    import copy

    import yaml

    from pipeline.config import validate_params

    project = Path(__file__).resolve().parent.parent
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key in ("distill", "prompts", "standins"):
        bad = copy.deepcopy(params)
        bad[key]["lr"] = 0
        with pytest.raises(ConfigError, match=rf"{key}\.lr: expected a number > 0"):
            validate_params(bad)


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_the_temporary_prefect_server_dies_with_its_stage(tmp_path):
    """kill -9 of a process holding a temporary server: the server goes too (no orphan)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    code = ("import os, time\n"
            "from pipeline.orchestration.server import prefect_api\n"
            "with prefect_api() as url:\n"
            "    print(url, flush=True)\n"
            "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        children = descendants(proc.pid)
        assert children, "no server process"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert gone(children)


def test_no_code_path_unpickles_extracts_or_listens_beyond_loopback():
    """Security as the fault review found it: no pickles (torch weights_only, numpy without pickles), YAML
    only through safe_load, tar members read but never extracted, servers on 127.0.0.1 only."""
    project = Path(__file__).resolve().parent.parent
    forbidden = re.compile(r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|yaml\.load\(|yaml\.unsafe_load|"
                           r"pickle\.loads?\(|\.extractall\(|\.extract\(|0\.0\.0\.0")
    hits = []
    for path in sorted([*(project / "pipeline").rglob("*.py"), *(project / "stages").rglob("*.py")]):
        with open(path, "rb") as fh:  # code only: strings (docstrings) and comments may name these
            code_lines: dict[int, str] = {}
            for tok in tokenize.tokenize(fh.readline):
                if tok.type not in (tokenize.STRING, tokenize.COMMENT, tokenize.ENCODING):
                    code_lines[tok.start[0]] = code_lines.get(tok.start[0], "") + tok.string
        hits += [f"{path.relative_to(project)}:{n}: {code}" for n, code in code_lines.items() if forbidden.search(code)]
    assert not hits, "\n".join(hits)
