"""Evaluation manifests: load one JSON file into checked `Case` records (format in shared/data/README.md).

Every problem is raised as `InputError` naming the case, the field and the path, before any model work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from samunet_core.errors import InputError

MODALITIES = ("CT", "MR", "US", "Endoscopy", "Dermoscopy", "Fundus", "Microscopy")
KINDS = ("2d", "3d")
Window = tuple[float, float]


@dataclass(frozen=True)
class Target2D:
    """One binary mask of a 2D case."""

    name: str
    mask: Path


@dataclass(frozen=True)
class Case:
    """One manifest case with absolute paths. 2D cases carry `targets`; 3D cases `labelmap` and `labels`."""

    id: str
    kind: str
    modality: str
    image: Path
    targets: tuple[Target2D, ...] = ()
    labelmap: Path | None = None
    labels: dict[int, str] = field(default_factory=dict)
    window: Window | None = None
    target_windows: dict[int, Window] = field(default_factory=dict)

    def window_for(self, label: int | None) -> Window | None:
        """The intensity window of one target: its `target_windows` entry, else the case's `window` (maybe None)."""
        if label is not None and label in self.target_windows:
            return self.target_windows[label]
        return self.window

    @property
    def n_targets_hint(self) -> int:
        """Number of 2D masks, or of labels for a 3D case (each label may give many slice targets)."""
        return len(self.targets) if self.kind == "2d" else len(self.labels)


@dataclass(frozen=True)
class Manifest:
    name: str
    root: Path
    cases: tuple[Case, ...]


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; paths inside it are resolved against the folder that holds it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist; pass the path of a manifest.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"manifest {path} is not valid JSON ({exc}); fix the file") from exc
    return parse_manifest(data, path.resolve().parent, source=str(path))


def parse_manifest(data: object, root: Path, source: str = "manifest") -> Manifest:
    """Check a manifest already parsed from JSON; `root` is the folder its relative paths start from."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: the top level must be an object with 'name' and 'cases'")
    cases_data = data.get("cases")
    if not isinstance(cases_data, list) or not cases_data:
        raise InputError(f"{source}: 'cases' must be a non-empty list")
    name = data.get("name", "")
    if not isinstance(name, str):
        raise InputError(f"{source}: 'name' must be a string")
    seen: set[str] = set()
    cases = []
    for index, case_data in enumerate(cases_data):
        case = _parse_case(case_data, index, root, source)
        if case.id in seen:
            raise InputError(f"{source}: case id '{case.id}' appears twice; ids must be unique")
        seen.add(case.id)
        cases.append(case)
    return Manifest(name=name, root=root, cases=tuple(cases))


def _parse_case(data: object, index: int, root: Path, source: str) -> Case:
    where = f"{source}: case #{index}"
    if not isinstance(data, dict):
        raise InputError(f"{where} must be an object")
    case_id = data.get("id")
    if not isinstance(case_id, str) or not case_id:
        raise InputError(f"{where}: 'id' must be a non-empty string")
    where = f"{source}: case '{case_id}'"
    kind = data.get("kind")
    if kind not in KINDS:
        raise InputError(f"{where}: 'kind' is {kind!r}; it must be one of {', '.join(KINDS)}")
    modality = data.get("modality")
    if modality not in MODALITIES:
        raise InputError(f"{where}: 'modality' is {modality!r}; it must be one of {', '.join(MODALITIES)}")
    image = _existing_path(data, "image", root, where, want_dir_ok=(kind == "3d"))
    window = _parse_window(data.get("window"), f"{where}: 'window'")
    if kind == "2d":
        for key in ("labelmap", "labels", "target_windows"):
            if key in data:
                raise InputError(f"{where}: '{key}' is only allowed in 3d cases; use 'targets' for 2d masks")
        return Case(case_id, kind, modality, image, targets=_parse_targets(data, root, where), window=window)
    if "targets" in data:
        raise InputError(f"{where}: 3d cases list 'labels' of their 'labelmap', not 'targets'")
    labelmap = _existing_path(data, "labelmap", root, where, want_dir_ok=False)
    labels = _parse_labels(data.get("labels"), where)
    target_windows = {}
    raw_tw = data.get("target_windows", {})
    if not isinstance(raw_tw, dict):
        raise InputError(f"{where}: 'target_windows' must be an object mapping label values to [low, high]")
    for key, value in raw_tw.items():
        label = _parse_label_key(key, f"{where}: 'target_windows'")
        if label not in labels:
            raise InputError(f"{where}: 'target_windows' names label {key}, which is not in 'labels'")
        target_windows[label] = _parse_window(value, f"{where}: 'target_windows'[{key}]")
    return Case(case_id, kind, modality, image, labelmap=labelmap, labels=labels, window=window,
                target_windows=target_windows)


def _existing_path(data: dict, key: str, root: Path, where: str, want_dir_ok: bool) -> Path:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: '{key}' must be a path relative to the manifest's folder")
    path = root / value
    if not path.exists():
        raise InputError(f"{where}: '{key}' file {path} does not exist; fix the path or restore the file")
    if path.is_dir() and not want_dir_ok:
        raise InputError(f"{where}: '{key}' {path} is a folder; it must be a file")
    return path


def _parse_targets(data: dict, root: Path, where: str) -> tuple[Target2D, ...]:
    raw = data.get("targets")
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: 'targets' must be a non-empty list of {{'name', 'mask'}}")
    targets = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise InputError(f"{where}: targets[{i}] needs a non-empty 'name' and a 'mask' path")
        if item["name"] in names:
            raise InputError(f"{where}: target name '{item['name']}' appears twice; names must be unique in a case")
        names.add(item["name"])
        mask = _existing_path(item, "mask", root, f"{where}, target '{item['name']}'", want_dir_ok=False)
        targets.append(Target2D(item["name"], mask))
    return tuple(targets)


def _parse_label_key(key: object, where: str) -> int:
    try:
        label = int(str(key))
    except ValueError:
        raise InputError(f"{where}: label value {key!r} is not an integer") from None
    if label <= 0:
        raise InputError(f"{where}: label value {key!r} must be a positive integer (0 is background)")
    return label


def _parse_labels(raw: object, where: str) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{where}: 'labels' must be a non-empty object mapping label values to names")
    labels = {}
    for key, name in raw.items():
        label = _parse_label_key(key, f"{where}: 'labels'")
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: 'labels'[{key}] must be a non-empty name")
        labels[label] = name
    return dict(sorted(labels.items()))


def _parse_window(raw: object, where: str) -> Window | None:
    if raw is None:
        return None
    if (not isinstance(raw, (list, tuple)) or len(raw) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)):
        raise InputError(f"{where} must be [low, high] numbers, got {raw!r}")
    low, high = float(raw[0]), float(raw[1])
    if not high > low:
        raise InputError(f"{where} is [{low}, {high}]; high must be greater than low")
    return (low, high)
