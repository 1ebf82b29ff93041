"""Atomic writes and run records shared by every stage.

Every output is written under a temporary name next to its destination and renamed into place, so an
interrupted stage never leaves a half-written file or folder behind and a previous good output survives
until the new one is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import (single-threaded): os.umask can only be read by setting it, which would race with
# files other threads create meanwhile.
_UMASK = _read_umask()


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file another library wrote the permissions a new file gets (safetensors' ``save_file`` writes
    through a 0600 temporary, unreadable to a lab group)."""
    os.chmod(path, 0o666 & ~_UMASK)


def _tmp_sibling(path: Path, *, is_dir: bool) -> Path:
    # The writer's pid is part of the name, so a later run can tell a killed writer's leftovers from a live
    # writer's work in progress (remove_stale_temporaries).
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-{os.getpid()}-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        mode = 0o777
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp, mode = Path(name), 0o666
    os.chmod(tmp, mode & ~_UMASK)  # mkdtemp/mkstemp make 0700/0600: outputs must be readable as usual
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``path`` (``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>``) left by
    writers that no longer run (killed with -9, or a machine that went down); return what was removed.

    A live writer's temporaries are left alone. Pids are only meaningful on this machine: on a filesystem
    shared between machines, two writers of one output must not run at once anyway (the stage lock).
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for leftover in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = leftover.name[len(f".{path.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place atomically (after
    removing the temporaries of ``path`` that a killed writer left)."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path, is_dir=False)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and paths so ``json.dumps`` accepts them."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a name
            np.save(fh, array)

    return atomic_write(path, write)


def atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Several named arrays in one ``.npz`` file (no pickles), atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` as a whole, on error it is removed.

    The old content of ``path`` (if any) is kept until the new folder is complete. Temporaries of ``path``
    left by a killed writer are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path, is_dir=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def environment_info() -> dict[str, Any]:
    """Python, platform and key package versions, recorded beside every stage output."""
    import importlib.metadata as md

    packages = {}
    for name in ("torch", "torchvision", "open_clip_torch", "dvc", "prefect", "webdataset", "numpy",
                 "faiss-cpu", "faiss-gpu"):
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": packages}


def write_run_info(path: str | os.PathLike, *, stage: str, params: dict[str, Any]) -> Path:
    """Write the resolved params a stage read plus environment and package versions to ``path``."""
    return atomic_write_json(path, {"stage": stage, "params": params, "environment": environment_info()})


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` through a temporary sibling and an atomic rename."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


class DamagedFileError(RuntimeError):
    """A stored output is missing, truncated or corrupt; the message names the file and the fix."""


class CheckpointError(DamagedFileError):
    """A checkpoint file is missing, truncated, corrupt or holds more than weights (pickled objects)."""


def load_array(path: str | os.PathLike, *, fix: str) -> np.ndarray:
    """``np.load(path)`` of a ``.npy`` array (no pickles); a missing or damaged file raises
    :class:`DamagedFileError` naming it and ``fix`` (numpy's own message names neither)."""
    path = Path(path)
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DamagedFileError(f"{path}: no such file; {fix}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DamagedFileError(f"{path}: damaged or incomplete ({exc}); {fix}") from None


def load_checkpoint(path: str | os.PathLike, *, what: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that cannot be read raises :class:`CheckpointError`.

    The message names the file, ``what`` was expected and ``fix``. torch's own message is left out on purpose
    (``from None``): for a file the restricted unpickler refuses it suggests ``weights_only=False``, which
    would run arbitrary code from the file; checkpoints here only ever hold tensors and plain containers.
    """
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file, expected {what}; {fix}") from None
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise CheckpointError(f"{path}: cannot be read as {what} ({type(exc).__name__}: the file is truncated, "
                              f"corrupt or not a weights-only checkpoint); {fix}") from None
