"""The wire format shared by `samunet serve` and `RemoteSession` (one place, both sides import it).

A mask travels as the part of the slice that holds it: `region` = [row0, col0, row1, col1) (half-open) and `rle`, the
run lengths of that window read row by row, starting with a run of zeros (possibly 0). An empty mask is region
[0, 0, 0, 0] and rle []. Logits never travel: the server keeps each answer's logits under an id the client sends back
as `mask_input_id` for the next click on that slice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
API_PREFIX = "/v1"


def is_loopback(host: str) -> bool:
    """True for an address only this computer can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """HxW bool -> {"region": [r0, c0, r1, c1], "rle": [runs...]} (see the module doc)."""
    mask = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return {"region": [0, 0, 0, 0], "rle": []}
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    flat = mask[r0:r1, c0:c1].reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"region": [r0, c0, r1, c1], "rle": [int(r) for r in runs]}


def decode_mask(payload: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """{"region", "rle"} -> HxW bool. ValueError when the payload does not fit `shape`."""
    r0, c0, r1, c1 = (int(v) for v in payload["region"])
    runs = [int(v) for v in payload["rle"]]
    mask = np.zeros(shape, bool)
    if r1 <= r0 or c1 <= c0:
        return mask
    if not (0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]):
        raise ValueError(f"mask region {payload['region']} is outside a {shape[0]}x{shape[1]} slice")
    if any(r < 0 for r in runs) or sum(runs) != (r1 - r0) * (c1 - c0):
        raise ValueError("mask run lengths do not cover the region")
    values = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    mask[r0:r1, c0:c1] = values.reshape(r1 - r0, c1 - c0)
    return mask
