"""A cohort of distinct real CT volumes for batch tests and the batch throughput script: consecutive slabs of one CT
(each slab keeps its place in space), each with a prompt file: a box around the largest labelled organ on the slab's
middle slice, propagated through the slab."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def make_slab_cohort(ct: Path, labels: Path, folder: Path, n_volumes: int, slices: int) -> list[Path]:
    """Write n_volumes slabs of `slices` axial slices as folder/slab<i>.nii.gz with folder/slab<i>.prompts.json
    beside each; returns the volume paths. The slabs tile the CT from its first slice."""
    import SimpleITK as sitk

    image, seg = sitk.ReadImage(str(ct)), sitk.ReadImage(str(labels))
    if image.GetSize()[2] < n_volumes * slices:
        raise ValueError(f"{ct} has {image.GetSize()[2]} slices, fewer than {n_volumes} x {slices}")
    folder.mkdir(parents=True, exist_ok=True)
    volumes = []
    for i in range(n_volumes):
        z0, z1 = i * slices, (i + 1) * slices
        slab, slab_seg = image[:, :, z0:z1], seg[:, :, z0:z1]
        path = folder / f"slab{i}.nii.gz"
        sitk.WriteImage(slab, str(path))
        middle = sitk.GetArrayFromImage(slab_seg)[slices // 2]  # rows = j, cols = i of the slab's middle k
        values, counts = np.unique(middle[middle > 0], return_counts=True)
        organ = int(values[np.argmax(counts)])
        rows, cols = np.nonzero(middle == organ)
        box = [[int(cols.min()), int(rows.min()), slices // 2], [int(cols.max()), int(rows.max()), slices // 2]]
        prompt = {"coordinates": "IJK", "segments": [{"name": f"label{organ}", "boxes": [{"corners": box}],
                                                      "propagate": True}]}
        (folder / f"slab{i}.prompts.json").write_text(json.dumps(prompt), encoding="utf-8")
        volumes.append(path)
    return volumes
