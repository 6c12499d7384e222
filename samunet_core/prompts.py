"""The prompt file (DESIGN.md): parse, validate, and convert every prompt to displayed-slice pixels.

```
{"coordinates": "RAS" | "LPS" | "IJK" | "pixel",
 "axis": "axial" | "coronal" | "sagittal",                      # default axial
 "segments": [{"name": "liver", "color": [r, g, b],             # colour 0..1, optional
               "points": [{"position": [x, y, z], "positive": true}, ...],
               "boxes": [{"corners": [[x0, y0, z0], [x1, y1, z1]]}, ...],
               "propagate": true,                                # default false
               "mode": "replace" | "add" | "remove"}]}           # optional, see below
```
RAS/LPS are mm, IJK a 0-based voxel index of the volume's own grid, pixel is (x=col, y=row) in a displayed slice:
[x, y] for a 2D image, [x, y, s] for slice s of a volume along `axis`. A box whose corners fall on one slice is a 2D
box there; corners on different slices make a 3D box that prompts every slice between them.
"mode" says how the segment's prompted slices combine with a segment of that name in the segmentation being edited
(`--edit`): "add" (the default for a segment that exists there), "replace" (the default otherwise) or "remove"; see
samunet_core.interaction.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.errors import InputError
from samunet_core.interaction import Click, Mode, SlicePrompts
from samunet_core.transforms import AXES, SliceFrame

COORDINATES = ("RAS", "LPS", "IJK", "pixel")
_TOP_KEYS = ("coordinates", "axis", "segments")
_SEGMENT_KEYS = ("name", "color", "points", "boxes", "propagate", "mode")
MODES = tuple(m.value for m in Mode)
_POINT_KEYS = ("position", "positive")
_BOX_KEYS = ("corners",)


@dataclass(frozen=True)
class SlicePoint:
    """A click on displayed slice `s`: (x=col, y=row) in slice pixels; positive adds, negative removes."""

    s: int
    x: float
    y: float
    positive: bool = True


@dataclass(frozen=True)
class SliceBox:
    """A box (x0, y0, x1, y1), max inclusive, in slice pixels, on every slice s0..s1 (s0 == s1: a 2D box)."""

    s0: int
    s1: int
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def is_3d(self) -> bool:
        return self.s1 > self.s0

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return self.x0, self.y0, self.x1, self.y1

    def covers(self, s: int) -> bool:
        return self.s0 <= s <= self.s1


@dataclass
class SegmentPrompts:
    """All prompts of one segment, in displayed-slice coordinates. mode: None when the file names none (the front end
    picks: "add" for a segment being edited, else "replace")."""

    name: str
    color: tuple[float, float, float] | None = None
    points: list[SlicePoint] = field(default_factory=list)
    boxes: list[SliceBox] = field(default_factory=list)
    propagate: bool = False
    mode: Mode | None = None

    def prompted_slices(self) -> list[int]:
        """Sorted slice indices that carry at least one prompt (every slice of a 3D box)."""
        slices = {p.s for p in self.points}
        for box in self.boxes:
            slices.update(range(box.s0, box.s1 + 1))
        return sorted(slices)

    def points_on(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(Nx2 float (x, y), N int labels 1 positive / 0 negative) of the clicks on slice `s` (N may be 0)."""
        pts = [p for p in self.points if p.s == s]
        coords = np.array([[p.x, p.y] for p in pts], dtype=np.float64).reshape(-1, 2)
        return coords, np.array([1 if p.positive else 0 for p in pts], dtype=np.int64)

    def boxes_on(self, s: int) -> np.ndarray:
        """Bx4 float (x0, y0, x1, y1) of the boxes covering slice `s` (B may be 0)."""
        return np.array([b.xyxy for b in self.boxes if b.covers(s)], dtype=np.float64).reshape(-1, 4)

    def slice_prompts(self, s: int) -> SlicePrompts:
        """Slice `s`'s prompts for samunet_core.interaction: the boxes covering it and its clicks, in file order."""
        return SlicePrompts(tuple(b.xyxy for b in self.boxes if b.covers(s)),
                            tuple(Click(p.x, p.y, p.positive) for p in self.points if p.s == s))


@dataclass
class PromptFile:
    """A validated prompt file, coordinates not yet converted. segments: the JSON segment dicts with defaults filled."""

    coordinates: str
    axis: str
    segments: list[dict[str, Any]]
    source: str = "prompt file"


@dataclass
class ResolvedPrompts:
    """Prompts of every segment converted to the displayed slices of one volume along `axis`."""

    axis: str
    n_slices: int
    slice_shape: tuple[int, int]
    segments: list[SegmentPrompts]


# ----- parsing -----
def read_prompt_file(path: str | os.PathLike) -> PromptFile:
    """Read and validate a prompt file; InputError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist; check the path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"prompt file {path} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise InputError(f"prompt file {path} is not valid JSON: {exc.msg} at {where}") from exc
    return parse_prompts(data, source=str(path))


def _fail(source: str, where: str, problem: str) -> InputError:
    return InputError(f"{source}: {where}: {problem}")


def _check_keys(obj: Any, allowed: tuple[str, ...], source: str, where: str) -> dict:
    if not isinstance(obj, dict):
        raise _fail(source, where, f"expected a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise _fail(source, where, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
    return obj


def _number_list(value: Any, lengths: tuple[int, ...], source: str, where: str) -> list[float]:
    ok = isinstance(value, list) and len(value) in lengths
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        want = " or ".join(str(n) for n in lengths)
        raise _fail(source, where, f"expected a list of {want} finite numbers, got {json.dumps(value)}")
    return [float(v) for v in value]


def _bool(value: Any, source: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(source, where, f"expected true or false, got {json.dumps(value)}")
    return value


def parse_prompts(data: Any, source: str = "prompt file") -> PromptFile:
    """Validate the JSON structure of DESIGN.md's prompt file; fills defaults (axis axial, positive true,
    propagate false, color None, mode None). Coordinates are checked against the image later, by `resolve_prompts`."""
    _check_keys(data, _TOP_KEYS, source, "top level")
    if "coordinates" not in data:
        raise _fail(source, "top level", f'missing "coordinates"; add one of {", ".join(COORDINATES)}')
    coordinates = data["coordinates"]
    canonical = {c.lower(): c for c in COORDINATES}
    if not isinstance(coordinates, str) or coordinates.lower() not in canonical:
        choices = ", ".join(COORDINATES)
        raise _fail(source, "coordinates", f"unknown value {json.dumps(coordinates)}; use one of {choices}")
    coordinates = canonical[coordinates.lower()]
    axis = data.get("axis", "axial")
    if not isinstance(axis, str) or axis.lower() not in AXES:
        raise _fail(source, "axis", f"unknown value {json.dumps(axis)}; use one of {', '.join(AXES)}")
    axis = axis.lower()
    segments = data.get("segments")
    if not isinstance(segments, list) or not segments:
        raise _fail(source, "segments", 'the segment list is empty or missing; give at least one segment with a "name"'
                    ' and "points" or "boxes"')
    lengths = (2, 3) if coordinates in ("pixel", "IJK") else (3,)
    parsed, names = [], set()
    for n, segment in enumerate(segments):
        where = f"segments[{n}]"
        _check_keys(segment, _SEGMENT_KEYS, source, where)
        name = segment.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(source, where, 'every segment needs a non-empty "name"')
        if name in names:
            raise _fail(source, where, f"segment name {name!r} is used twice; names must be unique")
        names.add(name)
        where = f"segment {name!r}"
        color = None
        if segment.get("color") is not None:
            color = tuple(_number_list(segment["color"], (3,), source, f"{where} color"))
            if not all(0.0 <= c <= 1.0 for c in color):
                raise _fail(source, f"{where} color", f"components must be between 0 and 1, got {list(color)}")
        points = []
        raw_points = segment.get("points", [])
        if not isinstance(raw_points, list):
            raise _fail(source, f"{where} points", "expected a list")
        for i, point in enumerate(raw_points):
            pw = f"{where} points[{i}]"
            _check_keys(point, _POINT_KEYS, source, pw)
            if "position" not in point:
                raise _fail(source, pw, 'missing "position"')
            position = _number_list(point["position"], lengths, source, f"{pw} position")
            points.append({"position": position, "positive": _bool(point.get("positive", True), source, pw)})
        boxes = []
        raw_boxes = segment.get("boxes", [])
        if not isinstance(raw_boxes, list):
            raise _fail(source, f"{where} boxes", "expected a list")
        for i, box in enumerate(raw_boxes):
            bw = f"{where} boxes[{i}]"
            _check_keys(box, _BOX_KEYS, source, bw)
            corners = box.get("corners")
            if not isinstance(corners, list) or len(corners) != 2:
                raise _fail(source, bw, f'"corners" must be two points [[...], [...]], got {json.dumps(corners)}')
            c0, c1 = (_number_list(c, lengths, source, f"{bw} corners") for c in corners)
            if len(c0) != len(c1):
                raise _fail(source, bw, "both corners need the same number of coordinates")
            boxes.append({"corners": [c0, c1]})
        if not points and not boxes:
            raise _fail(source, where, 'has no prompts; add "points" or "boxes"')
        propagate = _bool(segment.get("propagate", False), source, f"{where} propagate")
        mode = segment.get("mode")
        if mode is not None:
            if not isinstance(mode, str) or mode.lower() not in MODES:
                raise _fail(source, f"{where} mode", f"unknown value {json.dumps(mode)}; use one of "
                            f"{', '.join(MODES)} (or leave it out: add when editing an existing segment, else replace)")
            mode = mode.lower()
        parsed.append({"name": name, "color": color, "points": points, "boxes": boxes, "propagate": propagate,
                       "mode": mode})
    return PromptFile(coordinates=coordinates, axis=axis, segments=parsed, source=source)


# ----- conversion to slices -----
def _to_slice(prompts: PromptFile, frame: SliceFrame, position: list[float]) -> np.ndarray:
    """One position in the file's coordinates -> continuous (s, row, col)."""
    c = prompts.coordinates
    if frame.is_2d and c in ("RAS", "LPS"):
        raise InputError(f"{prompts.source}: a 2D image has no patient coordinates; use \"coordinates\": \"pixel\"")
    if c == "pixel":
        if len(position) == 2:
            if not frame.is_2d and frame.n_slices != 1:
                raise InputError(f"{prompts.source}: pixel position {position} has no slice index; for a volume give "
                                 f"[x, y, s] with s the {frame.axis} slice (0..{frame.n_slices - 1})")
            position = [*position, 0.0]
        x, y, s = position
        return np.array([s, y, x])
    if c == "IJK":
        if len(position) == 2:
            if not frame.is_2d:
                raise InputError(f"{prompts.source}: IJK position {position} needs three indices [i, j, k]")
            position = [*position, 0.0]
        return frame.ijk_to_slice(position)[0]
    return (frame.ras_to_slice if c == "RAS" else frame.lps_to_slice)(position)[0]


def _extent(prompts: PromptFile, frame: SliceFrame) -> str:
    """The image extent in the file's coordinates, for error messages."""
    size = frame.geometry.size
    if prompts.coordinates == "pixel":
        h, w = frame.slice_shape
        return f"x 0..{w - 1}, y 0..{h - 1}" + ("" if frame.is_2d else f", {frame.axis} slice 0..{frame.n_slices - 1}")
    if prompts.coordinates == "IJK":
        return f"i 0..{size[0] - 1}, j 0..{size[1] - 1}, k 0..{size[2] - 1}"
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    phys = frame.geometry.ijk_to_ras(corners) if prompts.coordinates == "RAS" else frame.geometry.ijk_to_lps(corners)
    lo, hi = phys.min(axis=0), phys.max(axis=0)
    return ", ".join(f"{a} {lo[n]:.1f}..{hi[n]:.1f} mm" for n, a in enumerate(prompts.coordinates))


def _inside(prompts: PromptFile, frame: SliceFrame, srowcol: np.ndarray, name: str, what: str, position) -> np.ndarray:
    """Check a continuous (s, row, col) is inside the image (its nearest voxel exists); return it clamped and rounded
    to 1e-4 px."""
    limits = (frame.n_slices, *frame.slice_shape)
    nearest = np.floor(np.round(srowcol, 6) + 0.5)
    if np.any(nearest < 0) or np.any(nearest > np.array(limits) - 1):
        raise InputError(
            f"{prompts.source}: segment {name!r}: {what} {list(position)} ({prompts.coordinates}) is outside the "
            f"image, whose extent is {_extent(prompts, frame)}"
        )
    # Rounded to 1e-4 px: the same prompt reached through another frame (RAS from a Slicer markup, IJK from a file)
    # then gives the same pixels, where float noise (17.9999991 vs 18) would move the model's truncated grid box.
    return np.round(np.clip(srowcol, 0, np.array(limits, dtype=np.float64) - 1), 4)


def slice_position(prompts: PromptFile, frame: SliceFrame, position: list[float], segment: str = "",
                   what: str = "point") -> np.ndarray:
    """One position in the file's coordinates -> (s, row, col) continuous displayed-slice pixels of `frame`, checked
    to lie in the image (InputError naming the segment otherwise): how `replay` places a file's prompts as markups."""
    return _inside(prompts, frame, _to_slice(prompts, frame, position), segment, what, position)


def resolve_prompts(prompts: PromptFile, frame: SliceFrame) -> ResolvedPrompts:
    """Convert every prompt to displayed-slice coordinates of `frame` (whose axis must be the file's axis).
    InputError names the segment, the prompt and the image extent for a prompt outside the image."""
    if frame.axis != prompts.axis:
        raise ValueError(f"frame axis {frame.axis} differs from the prompt file's axis {prompts.axis}")
    out = []
    for segment in prompts.segments:
        name = segment["name"]
        points = []
        for point in segment["points"]:
            s, row, col = _inside(prompts, frame, _to_slice(prompts, frame, point["position"]), name, "point",
                                  point["position"])
            points.append(SlicePoint(s=int(np.floor(s + 0.5)), x=float(col), y=float(row), positive=point["positive"]))
        boxes = []
        for n, box in enumerate(segment["boxes"]):
            c0, c1 = (_inside(prompts, frame, _to_slice(prompts, frame, c), name, "box corner", c)
                      for c in box["corners"])
            width, height = abs(c1[2] - c0[2]), abs(c1[1] - c0[1])
            if width < 1e-6 or height < 1e-6:
                raise InputError(f"{prompts.source}: segment {name!r} box {n + 1} has no area on the {frame.axis} "
                                 f"slices ({width:g} x {height:g} pixels between its corners {box['corners']}); give "
                                 "two opposite corners of the box")
            s0, s1 = sorted(int(np.floor(v + 0.5)) for v in (c0[0], c1[0]))
            boxes.append(SliceBox(s0=s0, s1=s1, x0=float(min(c0[2], c1[2])), y0=float(min(c0[1], c1[1])),
                                  x1=float(max(c0[2], c1[2])), y1=float(max(c0[1], c1[1]))))
        mode = segment.get("mode")
        out.append(SegmentPrompts(name=name, color=segment["color"], points=points, boxes=boxes,
                                  propagate=segment["propagate"], mode=Mode(mode) if mode is not None else None))
    return ResolvedPrompts(axis=frame.axis, n_slices=frame.n_slices, slice_shape=frame.slice_shape, segments=out)


def load_prompts(path: str | os.PathLike, volume) -> ResolvedPrompts:
    """Read a prompt file and convert it for `volume` (a samunet_core.io.volumes.Volume) along the file's axis."""
    prompts = read_prompt_file(path)
    return resolve_prompts(prompts, volume.frame(prompts.axis))
