"""`samunet serve` on loopback with the real model: results equal local ones, many clients at once, bad input and
faults answered with the right status, the server stays up."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import load_image

from samunet_core.cache import EmbeddingCache, volume_key
from samunet_core.errors import InputError
from samunet_core.interaction import Click, SlicePrompts, decode_slice
from samunet_core.remote import RemoteClient, RemoteError, RemoteSession
from samunet_core.serve.app import ServeConfig, create_app
from samunet_core.serve.protocol import decode_mask, encode_mask
from samunet_core.serve.server import BackgroundServer, check_host
from samunet_core.session import VolumeSession

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(default_openvino):
    srv = BackgroundServer(create_app(ServeConfig(token=TOKEN, max_upload_bytes=4 * 1024**2, max_sessions=40),
                                      predictor=default_openvino))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return RemoteClient(server.url, TOKEN)


def _raw(server, method, path, body=None, headers=None):
    req = urllib.request.Request(server.url + "/v1" + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mask_wire_format_round_trips():
    rng = np.random.default_rng(0)
    for mask in (rng.random((40, 50)) > 0.6, np.zeros((8, 9), bool), np.ones((5, 5), bool)):
        assert np.array_equal(decode_mask(encode_mask(mask), mask.shape), mask)
    with pytest.raises(ValueError):
        decode_mask({"region": [0, 0, 4, 4], "rle": [3, 3]}, (8, 8))


def test_remote_segmentation_equals_local(client, default_openvino, tmp_path):
    """Boxes and propagation (the demo CT's two lungs), through `segment_volume`: every voxel as local."""
    from samunet_core.segment import prepare_job, segment_volume

    job = prepare_job(REPO / "Resources/Samples/CTChest4.nrrd", REPO / "Resources/Samples/ctchest_prompts.json",
                      tmp_path / "out.seg.nrrd")
    local = segment_volume(job.volume, job.prompts, default_openvino, preset="lung", cache=EmbeddingCache())
    remote = segment_volume(job.volume, job.prompts, client, preset="lung")
    for name, mask in local.slice_masks.items():
        assert mask.any(axis=(1, 2)).sum() >= 5
        assert np.array_equal(remote.slice_masks[name], mask), name


def test_clicks_with_feedback_and_corrections_equal_local(client, default_openvino):
    image = load_image("amos_0004_75")
    slices = np.stack([image, image[::-1].copy()])
    prompts = SlicePrompts(boxes=[np.array([150.0, 150.0, 330.0, 300.0])],
                           clicks=[Click(240.0, 220.0, True), Click(170.0, 160.0, False), Click(300.0, 280.0, True)])
    key = volume_key(slices, "axial")
    with VolumeSession(default_openvino, lambda k: slices[k], 2, key, cache=EmbeddingCache()) as local, \
            RemoteSession(client, slices, key) as remote:
        for k in (0, 1):
            want = decode_slice(local, k, prompts)
            got = decode_slice(remote, k, prompts)
            assert got.calls == want.calls == 4  # the box, then each click with the previous logits fed back
            assert np.array_equal(got.mask, want.mask)


def test_sixteen_clients_fifty_clicks_each_get_their_own_masks(server):
    """Each client uploads its own volume (a bright square in its own place) and clicks 50 times at once with the
    others; every answer must be its own square, none an error."""
    errors: list[str] = []
    latencies: list[float] = []

    def one_client(i: int) -> None:
        try:
            c = RemoteClient(server.url, TOKEN)
            image = np.full((128, 128), 30, np.uint8)
            y, x = 20 + 5 * (i % 4), 20 + 20 * (i // 4)
            image[y:y + 24, x:x + 24] = 220
            slices = image[None]
            with RemoteSession(c, slices, f"client-{i}") as s:
                for n in range(50):
                    t0 = time.perf_counter()
                    out = s.predict(0, points=[[x + 8 + n % 8, y + 12]], labels=[1], boxes=[[x - 3, y - 3,
                                                                                            x + 26, y + 26]])
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    mask = out.masks[0]
                    inside = mask[y:y + 24, x:x + 24].sum()
                    if inside < 0.8 * 24 * 24 or mask.sum() > 1.3 * 24 * 24:
                        errors.append(f"client {i} click {n}: {inside} of {mask.sum()} pixels in its square")
        except Exception as exc:  # any failure of any client fails the test, with its message
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:5]
    assert len(latencies) == 800
    print(f"16 clients x 50 clicks: p50 {np.percentile(latencies, 50):.0f} ms, "
          f"p95 {np.percentile(latencies, 95):.0f} ms")


def test_bad_requests_get_their_status_and_the_server_stays_up(server, client):
    slices = np.zeros((2, 64, 64), np.uint8)
    s = RemoteSession(client, slices, "bad-input")
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    assert _raw(server, "GET", "/health")[0] == 200  # no token needed to ask what the server is
    assert _raw(server, "POST", f"/sessions/{s.id}/predict", b"{}")[0] == 401
    assert _raw(server, "POST", f"/sessions/{s.id}/predict", b"{}",
                {"Authorization": "Bearer wrong-token"})[0] == 401
    status, body = _raw(server, "POST", f"/sessions/{s.id}/predict", b"{not json", auth)
    assert status == 422 and "malformed" in body["detail"]
    status, body = _raw(server, "POST", f"/sessions/{s.id}/predict",
                        json.dumps({"slice": 0, "points": [[70, 10]], "labels": [1]}).encode(), auth)
    assert status == 422 and "outside" in body["detail"]
    assert _raw(server, "POST", "/sessions/nope/predict", json.dumps({"slice": 0, "boxes": [[1, 1, 9, 9]]}).encode(),
                auth)[0] == 404
    # an upload over the limit is refused as soon as its headers say so, before the body is read
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.putrequest("POST", "/v1/sessions")
    for name, value in {**auth, "X-Shape": "5,1024,1024", "Content-Length": str(5 * 1024**2)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(b"\0" * 65536)
    response = conn.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["detail"]
    conn.close()
    with pytest.raises(InputError, match="upload limit"):  # and the client does not even try
        RemoteSession(client, np.random.default_rng(0).integers(0, 255, (5, 1024, 1024), np.uint8), "too-big")
    status, body = _raw(server, "POST", "/sessions", b"not zlib", {**auth, "X-Shape": "1,4,4"})
    assert status == 422
    with pytest.raises(RemoteError) as exc:
        client.post_json(f"/sessions/{s.id}/predict", {"slice": 5, "boxes": [[1, 1, 9, 9]]})
    assert exc.value.status == 422 and "outside the volume" in str(exc.value)
    too_many = {"slice": 0, "points": [[5, 5]] * 65, "labels": [1] * 65}
    status, body = _raw(server, "POST", f"/sessions/{s.id}/predict", json.dumps(too_many).encode(), auth)
    assert status == 422 and "at most 64" in body["detail"]
    first = s.predict(1, boxes=[[10, 10, 40, 40]])
    status, body = _raw(server, "POST", f"/sessions/{s.id}/predict", json.dumps(
        {"slice": 1, "points": [[20, 20]], "labels": [1], "mask_input_id": first.logits.logits_id,
         "mask_input_rows": [3]}).encode(), auth)
    assert status == 422 and "rows" in body["detail"]
    assert s.predict(1, boxes=[[10, 10, 40, 40]]).masks.shape == (1, 64, 64)  # still serving
    s.close()


def test_a_lost_session_is_uploaded_again_and_the_client_says_so(default_openvino):
    """The server restarted mid-session: the client re-uploads once and continues with the same answer."""
    image = load_image("s0619_32")
    app = create_app(ServeConfig(token=TOKEN), predictor=default_openvino)
    first = BackgroundServer(app)
    port = first.port
    c = RemoteClient(first.url, TOKEN)
    s = RemoteSession(c, image[None], "restart")
    before = s.predict(0, boxes=[[30, 30, 120, 120]]).masks
    first.stop()
    with pytest.raises(RemoteError, match="cannot reach"):
        s.predict(0, boxes=[[30, 30, 120, 120]])
    second = BackgroundServer(create_app(ServeConfig(token=TOKEN), predictor=default_openvino), port=port)
    try:
        with pytest.warns(RuntimeWarning, match="uploading the volume again"):
            after = s.predict(0, boxes=[[30, 30, 120, 120]]).masks
        assert np.array_equal(before, after) and s.stats.reuploads == 1
    finally:
        second.stop()


def test_no_auth_only_on_loopback_and_versions_must_match(server):
    check_host("127.0.0.1", True)
    with pytest.raises(InputError, match="refused"):
        check_host("0.0.0.0", True)
    with pytest.raises(InputError, match="token is required"):
        create_app(ServeConfig(token=None), predictor=object())
    c = RemoteClient(server.url, TOKEN)
    assert c.info["protocol"] == 1 and c.info["model"] == "samunet_tinyvit"


def test_faults_a_killed_upload_a_slow_client_idle_expiry_and_rate_limits(default_openvino):
    """A client dying mid-upload and one uploading slowly do not stop others; idle sessions expire (the client then
    re-uploads); over the request rate a token gets 429."""
    import socket

    app = create_app(ServeConfig(token=TOKEN, idle_timeout_s=1.0, requests_per_s=20), predictor=default_openvino)
    srv = BackgroundServer(app)
    try:
        head = (f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nX-Shape: 4,256,256\r\n"
                f"Content-Length: {4 * 256 * 256}\r\n\r\n").encode()
        killed = socket.create_connection((srv.host, srv.port))
        killed.sendall(head + b"x" * 1000)
        killed.close()  # died mid-upload
        slow = socket.create_connection((srv.host, srv.port))
        slow.sendall(head + b"x" * 1000)  # ... and stays there
        c = RemoteClient(srv.url, TOKEN)
        image = load_image("s0114_111")
        s = RemoteSession(c, image[None], "faults")
        t0 = time.perf_counter()
        s.predict(0, boxes=[[40, 40, 120, 120]])
        assert time.perf_counter() - t0 < 30  # not stalled behind the slow upload
        slow.close()
        time.sleep(1.5)  # idle past the timeout: the session is gone, the client uploads again and says so
        with pytest.warns(RuntimeWarning, match="uploading the volume again"):
            s.predict(0, boxes=[[40, 40, 120, 120]])
        statuses = []
        for _ in range(40):
            try:
                c.post_json(f"/sessions/{s.id}/prefetch", {"slice": 0, "radius": 0})
            except RemoteError as exc:
                statuses.append(exc.status)
        assert 429 in statuses  # 20 requests/s per token, then "slow down"
        assert c.check()["protocol"] == 1  # still up
    finally:
        srv.stop()


def test_a_client_refuses_a_server_of_another_protocol(server, monkeypatch):
    from samunet_core import remote

    monkeypatch.setattr(remote, "PROTOCOL_VERSION", 99)
    with pytest.raises(InputError, match="install the same samunet version"):
        RemoteClient(server.url, TOKEN)


def test_segment_command_computes_on_the_server_and_writes_the_local_result(server, tmp_path):
    from samunet_core.cli import main

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    samples = REPO / "Resources/Samples"
    args = [str(samples / "CTChest4.nrrd"), "--prompts", str(samples / "ctchest_prompts.json"), "--preset", "lung",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert main(["segment", *args, "--output", str(tmp_path / "local.nii.gz"), "--runtime", "openvino"]) == 0
    assert main(["segment", *args, "--output", str(tmp_path / "remote.nii.gz"), "--server", server.url,
                 "--token-file", str(token_file)]) == 0
    import SimpleITK as sitk

    local = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local.nii.gz")))
    remote = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "remote.nii.gz")))
    assert local.any() and np.array_equal(local, remote)
    assert main(["segment", *args, "--output", str(tmp_path / "x.nii.gz"), "--server", server.url,
                 "--token-file", str(tmp_path / "missing")]) == 2


def test_bench_times_clicks_through_the_server(server):
    from samunet_core.bench import bench_remote, load_ct

    hu = load_ct(REPO / "Testing/data/totalsegmentator/example_ct_dicom_first4")
    result = bench_remote(server.url, TOKEN, hu, decoder_runs=100, clients=2, progress=lambda _m: None)
    assert result["errors"] == 0 and result["clients"] == 2
    assert result["click_to_mask_ms"]["n"] == 200 and result["click_to_mask_ms"]["p50"] > 0
    assert result["server_model"] == "samunet_tinyvit" and result["volume_shape"] == [4, 512, 512]
    with pytest.raises(RemoteError, match="cannot reach"):  # nothing listens on port 9: an error, never a hang
        bench_remote("http://127.0.0.1:9", TOKEN, hu, progress=lambda _m: None)


def test_https_with_the_servers_certificate(default_openvino):
    """--ssl-certfile/--ssl-keyfile: HTTPS on loopback; a client trusting that certificate works, one that does not
    is refused (no silent fallback to an unverified connection)."""
    tls = REPO / "Testing/data/tls"
    srv = BackgroundServer(create_app(ServeConfig(token=TOKEN), predictor=default_openvino),
                           ssl_certfile=str(tls / "localhost.crt"), ssl_keyfile=str(tls / "localhost.key"))
    try:
        assert srv.url.startswith("https://")
        c = RemoteClient(srv.url, TOKEN, ca_file=str(tls / "localhost.crt"))
        with RemoteSession(c, load_image("s0114_111")[None], "tls") as s:
            assert s.predict(0, boxes=[[40, 40, 120, 120]]).masks[0].any()
        with pytest.raises(RemoteError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            RemoteClient(srv.url, TOKEN)
    finally:
        srv.stop()


def test_sessions_share_the_cache_fairly(default_openvino):
    """One session encoding many slices gives up its own oldest slices, not another session's."""
    per_slice = default_openvino.encode(np.zeros((64, 64), np.uint8)).nbytes
    app = create_app(ServeConfig(token=TOKEN, cache_bytes=4 * per_slice), predictor=default_openvino)
    srv = BackgroundServer(app)
    try:
        c = RemoteClient(srv.url, TOKEN)
        a = RemoteSession(c, np.stack([np.full((64, 64), 10 * i, np.uint8) for i in range(8)]), "a")
        b = RemoteSession(c, np.stack([np.full((64, 64), 200 - 10 * i, np.uint8) for i in range(2)]), "b")
        for k in range(2):
            b.predict(k, boxes=[[10, 10, 40, 40]])
        for k in range(8):
            a.predict(k, boxes=[[10, 10, 40, 40]])
        state = app.state.samunet
        b_keys = list(state.sessions[b.id].cached)
        assert len(b_keys) == 2 and all(key in state.cache for key in b_keys)  # B kept its half
        assert len(state.sessions[a.id].cached) == 2  # A holds its half, its oldest slices went
        b.predict(0, boxes=[[10, 10, 40, 40]])
        assert b.stats.encodes == 2  # its slice 0 came from the cache, not a new encode
    finally:
        srv.stop()
