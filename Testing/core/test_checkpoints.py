"""Checkpoint reading: strict, CPU-safe, no pickled code without trust, clear errors for bad files."""

import os
import pickle

import pytest
import torch
from torch import nn

from samunet_core.checkpoints import load_strict, read_state_dict, sha256_of_file, verify_sha256
from samunet_core.errors import CheckpointError


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.head = nn.Conv2d(3, 1, 1)


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_authors_format_with_pickled_optimizer_loads_without_trust(tmp_path):
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    path = tmp_path / "epoch12_sam_unet.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer}, path)
    with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader refuses this file
        torch.load(path, weights_only=True)
    state = read_state_dict(path)
    assert set(state) == set(model.state_dict())
    fresh = Tiny()
    load_strict(fresh, state, source=str(path))
    assert torch.equal(fresh.encoder.weight, model.encoder.weight)


def test_arbitrary_pickled_code_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Tiny().state_dict(), "payload": RunsCodeWhenUnpickled()}, path)
    with pytest.raises(CheckpointError, match="trust"):
        read_state_dict(path)


def test_plain_and_wrapped_state_dicts(tmp_path):
    sd = Tiny().state_dict()
    for name, obj in [("plain.pt", sd), ("wrapped.pt", {"state_dict": sd})]:
        torch.save(obj, tmp_path / name)
        assert set(read_state_dict(tmp_path / name)) == set(sd)


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04broken zip" * 20])
def test_corrupt_files_give_clear_errors(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pth"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")


def test_non_state_dict_content(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        read_state_dict(tmp_path / "meta.pt")


def test_wrong_architecture_lists_keys():
    sd = Tiny().state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["encoder.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError) as info:
        load_strict(Tiny(), sd, source="other.pth")
    text = str(info.value)
    assert "head.bias" in text and "extra.weight" in text and "encoder.weight: file (5, 4) vs model (3, 4)" in text


def test_checksum(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(Tiny().state_dict(), path)
    digest = sha256_of_file(path)
    assert verify_sha256(path, digest) == digest
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_sha256(path, "0" * 64)
