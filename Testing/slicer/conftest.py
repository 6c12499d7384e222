"""Real MRML from PyPI slicer-core: a scene with the segmentations and volumes logics, as Slicer would set it up.

slicer-core has no application, so the globals Slicer's util helpers expect (slicer.mrmlScene, slicer.modules) are
set here. The module's Lib package is imported from SAMUNetSlicer/ the way Slicer puts it on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SAMUNetSlicer"))

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # not Testing/: it holds a `slicer` dir
from export_home import exports_in_a_temporary_folder  # noqa: E402,F401  (autouse: exports in a temporary folder)

CT_CANDIDATES = [REPO / "Testing/data/slicerio_ctchest/CTChest4.nrrd", REPO / "Resources/Samples/CTChest4.nrrd"]


def ct_path() -> Path:
    for path in CT_CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError(f"CTChest4.nrrd not found in {CT_CANDIDATES}")


class Mrml:
    """One scene plus the logics a test needs."""

    def __init__(self) -> None:
        import slicer

        from SAMUNetSlicerLib.replay import mrml_scene

        self.slicer = slicer
        self.scene, self.segmentations, self.volumes = mrml_scene()

    def load_ct(self, name: str = "ct"):
        volume = self.volumes.AddArchetypeVolume(str(ct_path()), name, 0)
        assert volume is not None, "CTChest4.nrrd did not load"
        return volume

    def add_segmentation(self, volume, *segment_names: str):
        seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        seg.CreateDefaultDisplayNodes()
        ids = [seg.GetSegmentation().AddEmptySegment(name, name) for name in segment_names]
        return seg, ids

    def add_volume(self, array_kji, ijk_to_ras, name: str = "synthetic"):
        """A scalar volume from a KxJxI array with a full 4x4 IJK->RAS matrix (oblique and flipped allowed)."""
        import numpy as np
        import vtk

        volume = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(np.asarray(ijk_to_ras)[r, c]))
        volume.SetIJKToRASMatrix(matrix)
        self.slicer.util.updateVolumeFromArray(volume, np.ascontiguousarray(array_kji))
        volume.CreateDefaultDisplayNodes()
        return volume


@pytest.fixture
def mrml() -> Mrml:
    return Mrml()


@pytest.fixture(scope="module")
def module_mrml() -> Mrml:
    return Mrml()


@pytest.fixture(scope="session")
def predictor():
    """The real LiteMedSAM through the engine, loaded once per test session."""
    from samunet_core.predictor import load_predictor

    return load_predictor("litemedsam", device="cpu")


@pytest.fixture(scope="session")
def default_predictor():
    """The default model (registry.DEFAULT_MODEL), as the module loads it."""
    from samunet_core.predictor import load_predictor
    from samunet_core.registry import DEFAULT_MODEL

    return load_predictor(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="session")
def embedding_cache():
    """One cache for the whole session: each real slice is encoded once, whichever test asks first."""
    from samunet_core.cache import EmbeddingCache

    return EmbeddingCache()


def reference_labels_kji():
    """The CT's reference labelmap (KxJxI uint8; 5 right lung, 6 left lung) from the same slicerio folder."""
    import nrrd
    import numpy as np

    path = ct_path().parent / "Segmentation.seg.nrrd"
    data, _ = nrrd.read(str(path))
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))


class MrmlThreadWatch:
    """Records every C call on an MRML object (nodes, scene, segmentations, segments) made off the main thread, by
    threads started while the watch is on (threading.setprofile reaches threads started after it is set)."""

    def __init__(self) -> None:
        import threading

        import slicer

        self._types = (slicer.vtkMRMLNode, slicer.vtkMRMLScene, slicer.vtkSegmentation, slicer.vtkSegment)
        self._main = threading.main_thread()
        self.off_main: list[tuple[str, str]] = []
        self.c_calls = 0

    def _profile(self, _frame, event, arg) -> None:
        import threading

        if event == "c_call":
            self.c_calls += 1
            owner = getattr(arg, "__self__", None)
            if isinstance(owner, self._types) and threading.current_thread() is not self._main:
                self.off_main.append((threading.current_thread().name, f"{type(owner).__name__}.{arg.__name__}"))

    def __enter__(self) -> MrmlThreadWatch:
        import threading

        threading.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        import threading

        threading.setprofile(None)


def raw_voxels(controller):
    """KxJxI: the controller's volume's own voxels (not its windowed snapshot: tests window them independently)."""
    import numpy as np
    import slicer

    return np.asarray(slicer.util.arrayFromVolume(controller.volume_node))
