"""The CI check of the module: compiles, every file listed in CMake, engine shipped, Lib Qt-free (and it can fail)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

CHECKER = REPO / "scripts/check_slicer_module.py"


def _run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "scripts/check_slicer_module.py")], capture_output=True,
                          text=True, timeout=60)


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "SAMUNetSlicer", root / "SAMUNetSlicer", ignore=ignore)
    shutil.copytree(REPO / "Resources", root / "Resources", ignore=ignore)
    (root / "scripts").mkdir()
    shutil.copy(CHECKER, root / "scripts")
    shutil.copy(REPO / "CMakeLists.txt", root)
    (root / "samunet_core").mkdir()
    (root / "samunet_core/__init__.py").write_text("")
    return root


def test_repository_module_passes():
    result = _run(REPO)
    assert result.returncode == 0, result.stderr


def test_unlisted_file_and_qt_in_lib_and_missing_engine_fail(tmp_path):
    root = _copy_tree(tmp_path)
    assert _run(root).returncode == 0
    (root / "SAMUNetSlicer/SAMUNetSlicerLib/extra.py").write_text("import qt\n")
    (root / "SAMUNetSlicer/Resources/Icons/extra.png").write_bytes(b"png")
    (root / "SAMUNetSlicer/broken.py").write_text("def f(:\n")
    shutil.rmtree(root / "samunet_core")
    result = _run(root)
    assert result.returncode == 1
    for expected in ("SAMUNetSlicerLib/extra.py is not listed in MODULE_PYTHON_SCRIPTS",
                     "Resources/Icons/extra.png is not listed in MODULE_PYTHON_RESOURCES",
                     "broken.py does not compile", "extra.py uses Qt",
                     "is not the repository's samunet_core package"):
        assert expected in result.stderr, result.stderr
