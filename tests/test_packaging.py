"""What an install provides: the callbacks as ``lightning_moo.callbacks`` (no top-level ``callbacks``
package in site-packages), a package list that covers every subpackage, and the solver showcase as a
runnable example outside the library."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code_or_args, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """The venv's Python in ``cwd`` (outside the repository), without PYTHONPATH, so that only what
    the install provides is importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_callbacks_install_under_lightning_moo(tmp_path):
    outside = run_python("import callbacks", tmp_path)
    assert outside.returncode != 0
    assert "No module named 'callbacks'" in outside.stderr

    inside = run_python(
        "import lightning_moo.callbacks as c\n"
        "from lightning_moo.callbacks import ConflictMonitor, NeuronSpecificity, Silhouette\n"
        "from lightning_moo.callbacks import analysis\n"
        "import sys\n"
        "assert ConflictMonitor.__module__ == 'lightning_moo.callbacks.conflict_monitor'\n"
        "assert not any(name == 'callbacks' or name.startswith('callbacks.') for name in sys.modules)\n"
        "print(c.__file__)",
        tmp_path,
    )
    assert inside.returncode == 0, inside.stderr
    assert Path(inside.stdout.strip()).name == "__init__.py"


def test_callbacks_import_each_other_relatively():
    for path in (ROOT / "callbacks").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert "from callbacks" not in source and "import callbacks" not in source, path


def test_package_list_covers_every_subpackage():
    """The package-dir mapping needs an explicit package list; a subpackage left out of it would be
    missing from wheels (and from the editable install)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapping = tool["package-dir"]
    assert mapping == {"lightning_moo.callbacks": "callbacks"}
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "lightning_moo").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    on_disk |= {
        "lightning_moo.callbacks." + ".".join(init.parent.relative_to(ROOT / "callbacks").parts)
        for init in (ROOT / "callbacks").rglob("__init__.py")
        if init.parent != ROOT / "callbacks"
    }
    on_disk.add("lightning_moo.callbacks")
    assert listed == on_disk, f"pyproject packages {sorted(listed)} vs on disk {sorted(on_disk)}"
    assert not (ROOT / "lightning_moo" / "callbacks").exists(), "would shadow the callbacks/ mapping"


@pytest.mark.timeout(300)
def test_wheel_has_no_top_level_callbacks(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # a copy, so that the build leaves nothing in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("lightning_moo", "callbacks"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = run_python(
        ["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(source)],
        tmp_path,
        timeout=280,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lightning_moo"}
    for module in ("__init__", "analysis", "conflict_monitor", "neurons", "silhouette"):
        assert f"lightning_moo/callbacks/{module}.py" in names
    assert "lightning_moo/showcase.py" not in names


def test_solver_showcase_example_runs(tmp_path):
    result = run_python([str(ROOT / "examples" / "solver_showcase.py"), "--tasks", "3", "--dim", "8"], tmp_path)
    assert result.returncode == 0, result.stderr
    for solver in ("Mean", "MGDA", "CAGrad", "NashMTL"):
        assert solver in result.stdout
    assert "3 task gradients" in result.stdout
