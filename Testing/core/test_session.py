"""VolumeSession on real slices with the real model: asked-for slice first, one worker thread, pre-emption, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import load_image

from samunet_core.cache import EmbeddingCache
from samunet_core.errors import InputError
from samunet_core.session import VolumeSession

CASES = ["s0619_32", "s0114_111", "s0619_32", "s0114_111", "s0619_32"]  # small real CT slices, 5-slice "volume"


class RecordingSlices:
    """Serves real slices and records which thread asked for which slice, in order."""

    def __init__(self) -> None:
        self.images = {k: load_image(case) for k, case in enumerate(CASES)}
        self.calls: list[tuple[int, int]] = []
        self.started = {k: threading.Event() for k in self.images}

    def __call__(self, k: int) -> np.ndarray:
        self.calls.append((k, threading.get_ident()))
        self.started[k].set()
        return self.images[k]


@pytest.fixture
def session(litemedsam):
    slices = RecordingSlices()
    sess = VolumeSession(litemedsam, slices, n_slices=len(CASES), volume_key="test-volume", cache=EmbeddingCache(),
                         prefetch_radius=1)
    sess.recorder = slices
    yield sess
    sess.close()


def test_asked_slice_first_then_neighbours_on_one_thread(session):
    emb = session.embedding(2)
    assert tuple(emb.tensors["image_embedding"].shape) == (1, 256, 64, 64)
    session.prefetch(2)
    session.request(3).result(timeout=120)
    session.request(1).result(timeout=120)
    order = [k for k, _ in session.recorder.calls]
    assert order[0] == 2 and sorted(order) == [1, 2, 3]
    threads = {tid for _, tid in session.recorder.calls}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert session.stats.encodes == 3
    again = session.embedding(2)  # cached: no new encode
    assert session.stats.encodes == 3
    assert torch.equal(again.tensors["image_embedding"], emb.tensors["image_embedding"])


def test_request_preempts_a_running_prefetch(session):
    session.prefetch(0, radius=0)  # starts encoding slice 0 in the background
    assert session.recorder.started[0].wait(30)
    urgent = session.request(4)  # must not wait for slice 0's encode to finish
    urgent.result(timeout=120)
    assert session.stats.preempted >= 1
    order = [k for k, _ in session.recorder.calls]
    assert order[:2] == [0, 4]  # 0 started, was pre-empted, 4 ran
    session.request(0).result(timeout=120)  # the pre-empted prefetch was re-queued and now completes
    assert [k for k, _ in session.recorder.calls] == [0, 4, 0]
    assert session.key(0) in session.cache and session.key(4) in session.cache


def test_cancel_pending_drops_queued_prefetches(session):
    session.embedding(2)
    session.prefetch(2, radius=2)
    dropped = session.cancel_pending()  # 4 neighbours were planned; at most one had reached the worker
    assert dropped >= 3
    assert session.pending() == []
    session.request(0).result(timeout=120)  # still serves requests after a cancel


def test_segment_runs_on_worker_and_matches_direct_predict(session, litemedsam):
    box = np.array([[40, 60, 110, 150]])
    future = session.segment(0, boxes=box)
    prediction = future.result(timeout=120)
    direct = litemedsam.predict(session.embedding(0), boxes=box)
    assert np.array_equal(prediction.masks, direct.masks)
    assert prediction.masks.shape == (1, 155, 225)


def test_bad_index_and_closed_session(session):
    with pytest.raises(InputError, match="outside the volume"):
        session.request(len(CASES))
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.request(0)


def test_disk_cache_means_no_reencoding_on_reopen(litemedsam, tmp_path):
    first = VolumeSession(litemedsam, RecordingSlices(), len(CASES), "vol", cache=EmbeddingCache(disk_dir=tmp_path))
    first.embedding(1)
    first.close()
    slices = RecordingSlices()
    reopened = VolumeSession(litemedsam, slices, len(CASES), "vol", cache=EmbeddingCache(disk_dir=tmp_path))
    reopened.embedding(1)
    reopened.close()
    assert slices.calls == [] and reopened.stats.encodes == 0
