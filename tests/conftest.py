"""Shared test setup: offline, telemetry-free, CPU-only environment and a throwaway Prefect backend."""
import os
import subprocess
import time

# --- Environment: set before anything imports prefect, torch or huggingface_hub (they read it early).
# Defaults only, so a developer can still override one from the shell.
os.environ["HF_HUB_OFFLINE"] = "1"  # forced: no test may silently depend on the network
for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_DISABLE_TELEMETRY": "1",
    "CUDA_VISIBLE_DEVICES": "",  # tests fake device lists; never grab a real GPU
}.items():
    os.environ.setdefault(_key, _value)

import pipeline  # noqa: E402,F401  (the torchvision guard must run before a test imports open_clip)
import pytest  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402


# --- Prefect: one temporary server + SQLite database for the whole session (startup costs seconds,
# so it is shared, never per test). Flows in tests never touch a developer's real Prefect server.
@pytest.fixture(autouse=True, scope="session")
def prefect_backend():
    from prefect.logging.configuration import setup_logging

    with prefect_test_harness():
        # Configure Prefect's console logging now, on the session's output: configured lazily inside a test
        # that captures stderr (capsys), its handler would keep that test's stream, closed once the test ends,
        # and every later log line would print "--- Logging error ---" into the next test's stderr.
        setup_logging()
        yield


# --- Models: the tiny digits VLM architectures with random weights (per test module; weights are frozen).
@pytest.fixture(scope="module")
def teacher():
    import torch

    from pipeline.models.factory import ModelSpec, load_model

    torch.manual_seed(0)
    return load_model(ModelSpec(name="digits-vit-teacher", pretrained="random", role="teacher"))


@pytest.fixture(scope="module")
def student():
    import torch

    from pipeline.models.factory import ModelSpec, load_model

    torch.manual_seed(1)
    return load_model(ModelSpec(name="digits-vit-student", pretrained="random", role="student"))


# --- Data: a tiny real digits benchmark (6 images per class and domain) as shards, built once.
@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """{domain: shard folder} for the mnist and usps digits domains."""
    from pipeline.data.classlists import load_classlist
    from pipeline.data.digits import build_domain
    from pipeline.data.shards import write_domain_shards

    root = tmp_path_factory.mktemp("digits")
    out = {}
    for domain in ("mnist", "usps"):
        build_domain(domain, root / "raw" / domain, per_class=6, image_size=32, seed=0)
        out[domain] = root / "shards" / domain
        write_domain_shards(root / "raw" / domain, out[domain], dataset="digits", domain=domain,
                            classes=load_classlist("digits"), maxcount=25, seed=0)
    return out


def copy_without_labels(shards, dst):
    """A copy of a shard folder whose ``.cls`` members are garbage: code that read labels would crash."""
    import io
    import tarfile

    from pipeline.data.shards import read_manifest

    dst.mkdir(parents=True)
    for name in read_manifest(shards)["shards"]:
        with tarfile.open(shards / name) as src, tarfile.open(dst / name, "w") as out:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if member.name.endswith(".cls"):
                    data = b"not-a-label"
                    member.size = len(data)
                out.addfile(member, io.BytesIO(data))
    for extra in ("manifest.json", "sizes.json"):
        (dst / extra).write_bytes((shards / extra).read_bytes())
    return dst


# --- The smoke project: `dvc repro` of the smoke configuration, built once per session (minutes) and copied
# by every test that changes it (copies are real copies: a test may damage files in place).
@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory):
    """The finished smoke project. UDA_DISTILL_SMOKE_PROJECT=<folder> reuses one built by `uda-distill smoke
    --workdir <folder>` with the same code (a developer's shortcut while iterating on slow tests)."""
    import os
    from pathlib import Path

    from pipeline.smoke import run_smoke

    if os.environ.get("UDA_DISTILL_SMOKE_PROJECT"):
        return Path(os.environ["UDA_DISTILL_SMOKE_PROJECT"])
    workdir = tmp_path_factory.mktemp("smoke-baseline") / "project"
    run_smoke(workdir)
    return workdir


def copy_project(src, dst, *, light: bool = False):
    """A copy of a smoke project: full (workspace, git repository and DVC cache), or ``light``: the workspace
    only, for tests that run stages directly and never call git or dvc (half the bytes: the cache is)."""
    import os
    import shutil

    skipped = {os.path.join(src, ".git"), os.path.join(src, ".dvc", "cache")} if light else set()
    shutil.copytree(src, dst, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if os.path.join(folder, n) in skipped])
    return dst


# --- Processes: what a stage process leaves running (Linux /proc and ps).
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def gone(pids: list[int], timeout: float = 20) -> bool:
    """Wait up to ``timeout`` s for every process of ``pids`` to end; True when they did."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(alive(p) for p in pids)
