"""`pip install .` and `pip install -e .`: the course's modules under their own names and the
`detector` command, usable from any folder.

Installed with ``--no-deps --no-build-isolation`` (torch and setuptools come from the test's
environment, nothing is downloaded), from a copy of the repository's files so that the build
leaves nothing (``build/``, ``*.egg-info``) in the working tree, into a ``--prefix`` folder
that a child Python adds as a site directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ("common", "two_stage_detector", "a4_helper", "detector_cli")
PACKAGES = ("eecs598", "recipe")
IMPORTS = (
    "import two_stage_detector, common, a4_helper, recipe, recipe.training, eecs598, "
    "eecs598.settings"
)


def copy_project(dest: Path) -> Path:
    """The files a build reads: pyproject, requirements, README, the modules, the packages."""
    dest.mkdir()
    for name in (
        "pyproject.toml",
        "requirements.txt",
        "requirements-onnx.txt",
        "README.md",
        *(f"{m}.py" for m in MODULES),
    ):
        shutil.copy2(REPO / name, dest / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return dest


def install(source: Path, prefix: Path, editable: bool) -> Path:
    """``pip install [-e] SOURCE --prefix PREFIX``; returns its site-packages folder."""
    args = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
            "--prefix", str(prefix), *(["-e"] if editable else []), str(source)]  # fmt: skip
    subprocess.run(args, check=True, cwd=source, capture_output=True, timeout=300)
    rel = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    return prefix / rel


def run_installed(site: Path, code: str, cwd: Path) -> str:
    """Run ``code`` in a Python that sees ``site`` as a site folder, from ``cwd``."""
    prelude = f"import site; site.addsitedir({str(site)!r}); "
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_installed_modules_and_command_work_from_another_folder(tmp_path, editable):
    source = copy_project(tmp_path / "clone")
    site = install(source, tmp_path / "prefix", editable)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    printed = run_installed(site, f"{IMPORTS}; print(two_stage_detector.__file__)", elsewhere)
    origin = Path(printed.strip()).parent
    # A regular install copies the modules; an editable one imports them from the clone.
    assert origin == (source if editable else site)

    # The console script: `detector` is `python detector_cli.py`; no command prints the help.
    script = tmp_path / "prefix" / "bin" / "detector"
    assert "detector_cli" in script.read_text()
    help_text = run_installed(site, "import sys, detector_cli; sys.exit(detector_cli.main([]))",
                              elsewhere)  # fmt: skip
    assert "usage:" in help_text and "{demo,train,evaluate,predict,export,audit}" in help_text
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # and it trained nothing
    # The `onnx` extra (pip install .[onnx]) lists requirements-onnx.txt.
    (metadata,) = site.glob("two_stage_detector-*.dist-info/METADATA")
    text = metadata.read_text()
    assert "Provides-Extra: onnx" in text
    extra = sorted(line.split()[1].split(">=")[0] for line in text.splitlines()
                   if line.startswith("Requires-Dist:") and 'extra == "onnx"' in line)  # fmt: skip
    assert extra == ["onnx", "onnxruntime", "onnxscript"]


def test_no_command_prints_help_and_exits_0():
    done = subprocess.run([sys.executable, "detector_cli.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and "train" in done.stdout
    assert "Training setup" not in done.stdout  # no demo started
