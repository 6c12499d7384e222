#!/usr/bin/env python3
"""Check the Slicer module the way a Slicer build would see it, without Slicer.

1. Every .py under SAMUNetSlicer/ byte-compiles.
2. Every .py under SAMUNetSlicer/ is listed in MODULE_PYTHON_SCRIPTS of SAMUNetSlicer/CMakeLists.txt, every file
   under SAMUNetSlicer/Resources/ in MODULE_PYTHON_RESOURCES, and everything listed exists.
3. The engine ships inside the module: the CMakeLists points SAMUNET_ENGINE_DIR at the repository's samunet_core
   package (which must exist) and both copies it at configure time and installs it.
4. SAMUNetSlicerLib never imports Qt (qt, ctk, slicer.app): it must run under slicer-core and a web front end.
5. The extension's CMakeLists has the required metadata and its icon and screenshot files exist.

Exit status 0 when all hold, 1 otherwise (each problem printed on its own line).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SAMUNetSlicer"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
ROOT_CMAKE = REPO / "CMakeLists.txt"
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

    # 3. the engine ships with the module
    engine = re.search(r'set\(\s*SAMUNET_ENGINE_DIR\s+"\$\{CMAKE_CURRENT_SOURCE_DIR\}/([^"]+)"\s*\)', text)
    if not engine:
        problems.append('SAMUNetSlicer/CMakeLists.txt must set(SAMUNET_ENGINE_DIR "${CMAKE_CURRENT_SOURCE_DIR}/..")')
    else:
        engine_dir = (MODULE_DIR / engine.group(1)).resolve()
        if engine_dir != (REPO / "samunet_core").resolve() or not (engine_dir / "__init__.py").is_file():
            problems.append(f"SAMUNET_ENGINE_DIR ({engine_dir}) is not the repository's samunet_core package")
        for rule in (r'file\(\s*COPY\s+"\$\{SAMUNET_ENGINE_DIR\}"[^)]*PATTERN\s+"\*\.py"',
                     r'install\(\s*DIRECTORY\s+"\$\{SAMUNET_ENGINE_DIR\}"[^)]*Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR'
                     r'[^)]*PATTERN\s+"\*\.py"'):
            if not re.search(rule, text, re.S):
                problems.append(f"SAMUNetSlicer/CMakeLists.txt lacks the engine rule matching /{rule}/")

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
        print("check_slicer_module: OK (module compiles, every file is listed, the engine ships, Lib is Qt-free)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
