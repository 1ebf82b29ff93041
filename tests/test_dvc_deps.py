"""Every library module a stage imports (directly or through other modules) is one of its ``deps`` in dvc.yaml.

A module missing there means DVC would not re-run the stage when that code changes, and a cached result would
silently stand for code that no longer produces it. Imports are read statically (``ast``), including imports
inside functions. Modules that do not shape results are not followed: run plumbing (orchestration, atomic
I/O, the params loader and schema language, the CLI, progress bars) and the package's import-time setup.
"""
import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
NOT_RESULT_SHAPING = ("pipeline/__init__.py", "pipeline/_torchvision_guard.py", "pipeline/io.py",
                      "pipeline/config.py", "pipeline/schema.py", "pipeline/cli.py", "pipeline/smoke.py",
                      "pipeline/progress.py", "pipeline/command.py",
                      "pipeline/orchestration/")


def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports. ``from pkg import sub`` names the submodule ``pkg.sub`` and not ``pkg``: a
    package's ``__init__`` counts only where a name defined there is imported (e.g. a registry)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if _module_file(sub) is not None else node.module)
    return {n for n in names if n.split(".")[0] == "pipeline"}


def library_closure(stage_file: Path) -> set[str]:
    """Repository-relative paths of the result-shaping pipeline modules ``stage_file`` imports."""
    seen: set[str] = set()
    todo = [stage_file]
    while todo:
        for name in _imports(todo.pop()):
            path = _module_file(name)
            if path is None:
                continue
            rel = path.relative_to(ROOT).as_posix()
            if rel in seen or rel.startswith(NOT_RESULT_SHAPING):
                continue
            seen.add(rel)
            todo.append(path)
    return seen


def test_every_imported_module_is_a_dependency_of_its_stage():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage
        deps = [d.rstrip("/") for d in stage["deps"] if not d.startswith("${")]
        assert f"stages/{name}.py" in deps, f"{name}: its own module is not a dependency"
        for module in sorted(library_closure(ROOT / "stages" / f"{name}.py")):
            if not any(module == d or module.startswith(d + "/") for d in deps):
                missing.setdefault(name, []).append(module)
    assert not missing, f"dvc.yaml deps lack modules their stage imports: {missing}"


def test_the_closure_follows_lazy_and_package_imports():
    closure = library_closure(ROOT / "stages" / "distill.py")
    assert "pipeline/methods/ekda.py" in closure  # through the registry in pipeline/methods/__init__.py
    assert "pipeline/methods/refine.py" in closure  # imported inside a function
    assert not any(m.startswith("pipeline/orchestration/") for m in closure)


def test_every_task_has_a_model_artifact():
    """dvc.yaml cannot generate `artifacts:` entries from params: each task needs its own, pointing at its bundle."""
    artifacts = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
    paths = {a["path"] for a in artifacts.values()}
    for params in ("params.yaml", "configs/digits_clip.yaml"):
        for task in yaml.safe_load((ROOT / params).read_text())["tasks"]:
            assert "${paths.bundles}/" + task in paths, f"{params}: task {task} has no artifact entry in dvc.yaml"
    assert all(a["type"] == "model" for a in artifacts.values())


def test_no_committed_relative_remote_url():
    """DVC resolves a relative remote URL against the wrong folder (treeverse/dvc#10054, #10617): `dvc push
    --all-commits` wrote into a folder at the filesystem root. Remotes are the user's, added with --local."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    for section in config.sections():
        url = config[section].get("url")
        assert url is None or "://" in url or url.startswith("/"), f".dvc/config [{section}] url {url!r} is relative"
