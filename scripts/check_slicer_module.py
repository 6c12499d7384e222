#!/usr/bin/env python3
"""Check the Slicer module the way a Slicer build would see it, without Slicer.

1. Every .py under SAMUNetSlicer/ byte-compiles.
2. Every .py under SAMUNetSlicer/ is listed in MODULE_PYTHON_SCRIPTS of SAMUNetSlicer/CMakeLists.txt, every file
   under SAMUNetSlicer/Resources/ in MODULE_PYTHON_RESOURCES, and everything listed exists.
3. The engine ships inside the module as SAMUNetSlicer/SHIPPED_FILES.txt lists it (format at the top of that file):
   the CMakeLists reads that list and both copies (configure time) and installs every listed file; every listed file
   exists; every file under samunet_core/ is listed or excluded with a reason; no shipped module (nor any module
   script) imports an engine module that does not ship (static imports, function-level ones included, not
   `if TYPE_CHECKING:` blocks); and the weight files of the default model (registry.DEFAULT_MODEL) and of every other
   model whose weights live inside samunet_core are listed.
4. SAMUNetSlicerLib never imports Qt (qt, ctk, slicer.app): it must run under slicer-core and a web front end.
5. The extension's CMakeLists has the required metadata and its icon and screenshot files exist.

Exit status 0 when all hold, 1 otherwise (each problem printed on its own line).
"""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SAMUNetSlicer"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
ROOT_CMAKE = REPO / "CMakeLists.txt"
SHIP_LIST = MODULE_DIR / "SHIPPED_FILES.txt"
ENGINE = "samunet_core"
QT_IMPORT = re.compile(r"^\s*(import\s+(qt|ctk)\b|from\s+(qt|ctk)\b)|slicer\.app\b|slicer\.util\.mainWindow", re.M)


def cmake_list(text: str, variable: str, module_name: str) -> list[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    if not match:
        return []
    items = re.sub(r"#.*", "", match.group(1)).split()
    return [item.replace("${MODULE_NAME}", module_name) for item in items]


def module_files(suffixes: tuple[str, ...] | None, under: Path) -> set[str]:
    return {p.relative_to(MODULE_DIR).as_posix() for p in under.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and (suffixes is None or p.suffix in suffixes)}


# ---------------------------------------------------------------------------------------------------------------------
# The ship list (SAMUNetSlicer/SHIPPED_FILES.txt): parsed exactly as the CMakeLists reads it
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ShipList:
    """files: shipped paths relative to the repository root, in list order; excludes: (glob, reason, line number)."""

    files: list[str] = field(default_factory=list)
    excludes: list[tuple[str, str, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def excluded(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern, _, _ in self.excludes)


def read_ship_list(path: Path = SHIP_LIST) -> ShipList:
    """Parse the ship list the way SAMUNetSlicer/CMakeLists.txt does (comments after '#', blank lines and
    "exclude GLOB  # reason" lines skipped there), and report format problems CMake would not notice."""
    result = ShipList()
    name = path.name
    if not path.is_file():
        result.problems.append(f"missing {name} (the list of engine files that ship with the module)")
        return result
    text = path.read_text(encoding="utf-8")
    if ";" in text:  # CMake's file(STRINGS) splits list items at ';'
        result.problems.append(f"{name} contains ';', which CMake's file(STRINGS) would split into list items")
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        entry, _, comment = raw.partition("#")
        entry = entry.strip()
        if not entry:
            continue
        where = f"{name} line {number}"
        if re.match(r"exclude[ \t]", entry):
            pattern = entry[len("exclude"):].strip()
            if not pattern or not comment.strip():
                result.problems.append(f"{where}: an exclude line needs a glob and a reason: "
                                       "'exclude samunet_core/x.py  # why it does not ship'")
                continue
            result.excludes.append((pattern, comment.strip(), number))
            continue
        if re.search(r"[\s*?\[\]\\]", entry) or entry.startswith("/") or ".." in entry.split("/"):
            result.problems.append(f"{where}: '{entry}' must be one plain path relative to the repository root "
                                   "(no spaces, globs, backslashes, '..' or leading '/')")
            continue
        if entry in seen:
            result.problems.append(f"{where}: {entry} is listed twice")
            continue
        seen.add(entry)
        result.files.append(entry)
    return result


def engine_files(root: Path = REPO) -> list[str]:
    """Every file of the engine package (repository-relative, posix), without Python caches."""
    engine = root / ENGINE
    return sorted(p.relative_to(root).as_posix() for p in engine.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"))


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def engine_imports(path: Path, package: str) -> list[tuple[str, bool]]:
    """(module, must_be_module) for every samunet_core import in `path` (function-level ones included, not
    `if TYPE_CHECKING:` blocks). `package` resolves relative imports. Names imported with `from X import name` are
    returned with must_be_module False: they may be submodules or attributes."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, True) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, True))
            found.extend((f"{base}.{alias.name}", False) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return [(m, strict) for m, strict in found if m.split(".")[0] == ENGINE]


def imported_engine_files(sources: list[Path], root: Path = REPO) -> tuple[dict[str, str], list[str]]:
    """({engine file (repository-relative): the first file that imports it}, problems) for the engine modules
    `sources` import, directly or through each other (each module's parent packages included)."""
    needed: dict[str, str] = {}
    problems: list[str] = []
    queue = [(src, "SAMUNetSlicerLib" if src.parent.name == "SAMUNetSlicerLib" else "") for src in sources]
    done: set[Path] = set()
    while queue:
        src, package = queue.pop()
        if src in done:
            continue
        done.add(src)
        who = src.relative_to(root).as_posix() if src.is_relative_to(root) else str(src)
        for module, must_be_module in engine_imports(src, package):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                target = _module_file(name, root)
                if target is None:
                    if i < len(parts) or must_be_module:
                        problems.append(f"{who} imports {module}, which is not a module of {ENGINE}")
                    break
                rel = target.relative_to(root).as_posix()
                needed.setdefault(rel, who)
                queue.append((target, name if target.name == "__init__.py" else name.rpartition(".")[0]))
    return needed, problems


def bundled_weights(root: Path = REPO) -> tuple[str, dict[str, list[str]]]:
    """(DEFAULT_MODEL, {model: its weight files inside samunet_core, repository-relative}) from the registry of
    the engine in `root` (imports samunet_core.registry, which loads no torch)."""
    sys.path.insert(0, str(root))
    try:
        from samunet_core import registry
    finally:
        sys.path.remove(str(root))
    files = {name: [Path(p).resolve().relative_to(root.resolve()).as_posix()
                    for p in registry.bundled_weight_files(name)] for name in registry.model_names()}
    return registry.DEFAULT_MODEL, files


def check_ship_list(root: Path = REPO) -> list[str]:
    """Problems of SAMUNetSlicer/SHIPPED_FILES.txt against the repository in `root` (see the module doc, rule 3)."""
    module_dir = root / "SAMUNetSlicer"
    ship = read_ship_list(module_dir / SHIP_LIST.name)
    problems = list(ship.problems)
    listed = set(ship.files)
    for entry in ship.files:
        if not (root / entry).is_file():
            problems.append(f"{SHIP_LIST.name} lists {entry}, which does not exist")
        elif ship.excluded(entry):
            problems.append(f"{SHIP_LIST.name} both lists and excludes {entry}")
    if not (root / ENGINE / "__init__.py").is_file():
        problems.append(f"{ENGINE}/__init__.py does not exist: the engine must ship with the module")
        return problems
    for entry in engine_files(root):
        if entry not in listed and not ship.excluded(entry):
            problems.append(f"{entry} is neither listed nor excluded (with a reason) in {SHIP_LIST.name}")
    for pattern, _, number in ship.excludes:
        if not any(fnmatch.fnmatchcase(entry, pattern) for entry in engine_files(root)):
            problems.append(f"{SHIP_LIST.name} line {number}: 'exclude {pattern}' matches no file")
    sources = sorted(p for p in module_dir.rglob("*.py") if "__pycache__" not in p.parts)
    sources += [root / entry for entry in ship.files if entry.endswith(".py") and (root / entry).is_file()]
    needed, import_problems = imported_engine_files(sources, root)
    problems += import_problems
    for entry, importer in sorted(needed.items()):
        if entry not in listed:
            problems.append(f"{importer} imports {entry}, which does not ship: list it in {SHIP_LIST.name}")
    try:
        default, weights = bundled_weights(root)
    except Exception as exc:  # noqa: BLE001 - any failure to read the registry is a finding
        problems.append(f"cannot read the model registry ({type(exc).__name__}: {exc})")
        return problems
    for model, files in weights.items():
        for entry in files:
            if entry not in listed:
                what = "the default model" if model == default else "model"
                problems.append(f"{entry} (weights of {what} {model}) is not listed in {SHIP_LIST.name}: an "
                                "installed extension could not load it")
    return problems


def check() -> list[str]:
    problems: list[str] = []
    if not MODULE_CMAKE.is_file():
        return [f"missing {MODULE_CMAKE.relative_to(REPO)}"]
    text = MODULE_CMAKE.read_text()
    name_match = re.search(r"set\(\s*MODULE_NAME\s+(\S+)\s*\)", text)
    module_name = name_match.group(1) if name_match else ""
    if module_name != "SAMUNetSlicer":
        problems.append("SAMUNetSlicer/CMakeLists.txt must set(MODULE_NAME SAMUNetSlicer)")

    # 1. byte-compile (in memory: nothing written into the source tree)
    for path in sorted(MODULE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        try:
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        except SyntaxError as exc:
            problems.append(f"{path.relative_to(REPO)} does not compile: {exc}")

    # 2. listed == present
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", module_name)
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", module_name)
    for kind, listed, present in (
            ("MODULE_PYTHON_SCRIPTS", scripts, module_files((".py",), MODULE_DIR)),
            ("MODULE_PYTHON_RESOURCES", resources, module_files(None, MODULE_DIR / "Resources"))):
        for missing in sorted(present - set(listed)):
            problems.append(f"{missing} is not listed in {kind} of SAMUNetSlicer/CMakeLists.txt")
        for entry in listed:
            if not (MODULE_DIR / entry).is_file():
                problems.append(f"{kind} lists {entry}, which does not exist")
    if "slicerMacroBuildScriptedModule" not in text:
        problems.append("SAMUNetSlicer/CMakeLists.txt does not call slicerMacroBuildScriptedModule")

    # 3. the engine ships with the module: the CMakeLists reads the ship list, copies and installs each file
    problems += check_ship_list(REPO)
    rules = (
        (r'set\(\s*SAMUNET_SHIP_LIST\s+"\$\{CMAKE_CURRENT_SOURCE_DIR\}/SHIPPED_FILES\.txt"\s*\)',
         "set(SAMUNET_SHIP_LIST \"${CMAKE_CURRENT_SOURCE_DIR}/SHIPPED_FILES.txt\")"),
        (r'file\(\s*STRINGS\s+"\$\{SAMUNET_SHIP_LIST\}"', 'file(STRINGS "${SAMUNET_SHIP_LIST}" ...)'),
        (r'file\(\s*COPY\s+"\$\{_samunet_source\}"\s+DESTINATION\s+"\$\{CMAKE_BINARY_DIR\}/'
         r'\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}/', "a configure-time file(COPY) of each listed file"),
        (r'install\(\s*FILES\s+"\$\{_samunet_source\}"\s+DESTINATION\s+"\$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}/'
         r'[^)]*COMPONENT\s+RuntimeLibraries', "an install(FILES ... COMPONENT RuntimeLibraries) of each listed file"),
    )
    for rule, what in rules:
        if not re.search(rule, text, re.S):
            problems.append(f"SAMUNetSlicer/CMakeLists.txt lacks {what}")
    if re.search(r"GLOB(_RECURSE)?[^)]*samunet|SAMUNET_ENGINE_DIR", text):
        problems.append("SAMUNetSlicer/CMakeLists.txt still globs the engine: ship exactly what SHIPPED_FILES.txt "
                        "lists")

    # 4. no Qt in the Lib
    for path in sorted((MODULE_DIR / "SAMUNetSlicerLib").rglob("*.py")):
        source = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        body = re.sub(r'""".*?"""', "", source, flags=re.S)
        if QT_IMPORT.search(body):
            problems.append(f"{path.relative_to(REPO)} uses Qt or the Slicer application; keep it in the widget")

    # 5. extension metadata
    if not ROOT_CMAKE.is_file():
        problems.append("missing root CMakeLists.txt")
    else:
        root = ROOT_CMAKE.read_text()
        for pattern, what in ((r'EXTENSION_CATEGORY\s+"Segmentation"', "EXTENSION_CATEGORY Segmentation"),
                              (r'EXTENSION_DEPENDS\s+"PyTorch"', 'EXTENSION_DEPENDS "PyTorch"'),
                              (r"add_subdirectory\(\s*SAMUNetSlicer\s*\)", "add_subdirectory(SAMUNetSlicer)"),
                              (r"EXTENSION_DESCRIPTION\s+\"[^\"]{40,}\"", "a real EXTENSION_DESCRIPTION"),
                              (r"Slicer_EXTENSION_CPACK", "include(${Slicer_EXTENSION_CPACK})")):
            if not re.search(pattern, root):
                problems.append(f"root CMakeLists.txt lacks {what}")
        for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
            match = re.search(variable + r'\s+"([^"]+)"', root)
            if not match:
                problems.append(f"root CMakeLists.txt lacks {variable}")
                continue
            for url in match.group(1).split():
                local = REPO / re.sub(r"^.*?/main/", "", url)
                if not local.is_file():
                    problems.append(f"{variable} points at {url}, but {local.relative_to(REPO)} does not exist")
    return problems


def main() -> int:
    problems = check()
    for problem in problems:
        print(f"check_slicer_module: {problem}", file=sys.stderr)
    if not problems:
        print("check_slicer_module: OK (module compiles, every file is listed, the engine ships as "
              "SHIPPED_FILES.txt lists it, Lib is Qt-free)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
