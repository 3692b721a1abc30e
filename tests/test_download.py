"""ris_utils.download against a local HTTP server on 127.0.0.1 (nothing here touches the internet).

The server (http.server in a daemon thread) serves in-memory files, honours ``Range`` requests, can cut the
connection in the middle of a body a given number of times, and shuts itself down after 60 s at the latest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ris_utils import download as dl
from ris_utils.data import paper, refer


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        cuts = srv.cuts.get(self.path, 0)
        if cuts > 0:  # send part of the body, then drop the connection
            srv.cuts[self.path] = cuts - 1
            self.wfile.write(chunk[: srv.cut_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(chunk)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.cuts, srv.requests = {}, {}, []
    srv.cut_after, srv.honour_range = 1000, True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60.0, srv.shutdown)  # bounded: stops by itself
    watchdog.daemon = True
    watchdog.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    watchdog.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _source(srv, path: str, body: bytes | None = None, **kw) -> dl.Source:
    if body is not None:
        srv.files[path] = body
    fields = dict(name=path.strip("/").replace("/", "-"), urls=(srv.url + path,), filename=path.rsplit("/", 1)[1],
                  dest="downloads", provides=())
    fields.update(kw)
    return dl.Source(**fields)


def test_resume_after_cut_connection(server, tmp_path):
    body = _payload(50_000)
    server.files["/f.bin"] = body
    server.cuts["/f.bin"] = 2  # the first two transfers die after 1000 bytes
    out = dl.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=4, backoff=0, progress=False)
    assert out.read_bytes() == body
    ranges = [r for p, r in server.requests if p == "/f.bin"]
    assert ranges == [None, "bytes=1000-", "bytes=2000-"]
    assert not (tmp_path / "f.bin.part").exists()


def test_resume_from_existing_part_file(server, tmp_path):
    body = _payload(20_000, seed=1)
    server.files["/g.bin"] = body
    (tmp_path / "g.bin.part").write_bytes(body[:7_000])  # left by an interrupted earlier run
    dl.fetch(server.url + "/g.bin", tmp_path / "g.bin", expected_size=len(body), progress=False)
    assert (tmp_path / "g.bin").read_bytes() == body
    assert server.requests == [("/g.bin", "bytes=7000-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    body = _payload(10_000, seed=2)
    server.files["/h.bin"] = body
    server.honour_range = False
    (tmp_path / "h.bin.part").write_bytes(b"x" * 3_000)  # stale bytes must not survive
    dl.fetch(server.url + "/h.bin", tmp_path / "h.bin", progress=False)
    assert (tmp_path / "h.bin").read_bytes() == body


def test_too_many_cuts_gives_up_keeping_the_part(server, tmp_path):
    server.files["/k.bin"] = _payload(10_000)
    server.cuts["/k.bin"] = 10
    with pytest.raises(dl.DownloadError, match="gave up after 2 interrupted attempts"):
        dl.fetch(server.url + "/k.bin", tmp_path / "k.bin", retries=2, backoff=0, progress=False)
    assert (tmp_path / "k.bin.part").stat().st_size == 3_000  # resumable on the next run


def test_checksum_mismatch_renames_file_and_says_so(server, tmp_path):
    body = _payload(5_000)
    src = _source(server, "/bad.pth", body, sha256="0" * 64, checksum_source="test table")
    with pytest.raises(dl.ChecksumError) as e:
        dl.ensure(src, tmp_path, progress=False)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and hashlib.sha256(body).hexdigest() in msg and "test table" in msg
    assert (tmp_path / "downloads" / "bad.pth.corrupt").exists()
    assert not (tmp_path / "downloads" / "bad.pth").exists()


def test_size_mismatch_is_caught_before_downloading(server, tmp_path):
    src = _source(server, "/big.pth", _payload(4_000), size=9_999)
    with pytest.raises(dl.ChecksumError, match="announces 4000 bytes, expected 9999"):
        dl.ensure(src, tmp_path, progress=False)


def test_http_404_names_the_url(server, tmp_path):
    src = _source(server, "/missing.zip")
    with pytest.raises(dl.DownloadError, match=r"every URL failed:[\s\S]*HTTP 404"):
        dl.ensure(src, tmp_path, progress=False)


def test_mirror_used_when_first_url_fails(server, tmp_path):
    body = _payload(3_000)
    server.files["/mirror/m.bin"] = body
    src = dl.Source(name="m", urls=(server.url + "/gone/m.bin", server.url + "/mirror/m.bin"), filename="m.bin",
                    dest="downloads", sha256=hashlib.sha256(body).hexdigest())
    r = dl.ensure(src, tmp_path, progress=False)
    assert r["status"] == "downloaded" and (tmp_path / "downloads/m.bin").read_bytes() == body


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_offline_message(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/refcoco.zip"
    with pytest.raises(dl.OfflineError, match="looks offline"):
        dl.fetch(url, tmp_path / "refcoco.zip", progress=False)
    monkeypatch.setitem(dl.SOURCES, "refcoco", dataclasses.replace(dl.SOURCES["refcoco"], urls=(url,)))
    rc = dl.cli(["--what", "refcoco", "--data-root", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "OFFLINE" in err and url in err and str(tmp_path / "downloads" / "refcoco.zip") in err


def test_unpublished_checksum_is_recorded_then_enforced(server, tmp_path):
    body = _payload(6_000, seed=3)
    src = _source(server, "/ck.pth", body, dest="checkpoints")
    r = dl.ensure(src, tmp_path, progress=False)
    assert r["recorded"] is True
    lock = json.loads((tmp_path / dl.LOCK_NAME).read_text())
    assert lock[src.name]["sha256"] == hashlib.sha256(body).hexdigest() and lock[src.name]["size"] == 6_000
    # the server now serves other bytes: a fresh download must be refused against the record
    (tmp_path / "checkpoints/ck.pth").unlink()
    server.files["/ck.pth"] = _payload(6_000, seed=4)
    with pytest.raises(dl.ChecksumError, match="checksums.lock.json"):
        dl.ensure(src, tmp_path, progress=False)


def _refer_zip(tmp_path) -> bytes:
    """A REFER-format refcoco.zip (refcoco/refs(unc).p + instances.json) as the UNC server lays it out."""
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 3:7] = 1
    ann = refer.make_annotation(1, 5, 1, mask)
    refs = [refer.make_ref(0, ann, "train", [refer.make_sentence("the left box", 0)], "COCO_train2014_5.jpg"),
            refer.make_ref(1, ann, "testA", [refer.make_sentence("box", 1), refer.make_sentence("it", 2)],
                           "COCO_train2014_5.jpg")]
    images = [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": 8, "width": 10}]
    src = tmp_path / "build"
    refer.write_refer(src, "refcoco", "unc", refs, images, [ann], [{"id": 1, "name": "box"}])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted((src / "refcoco").iterdir()):
            zf.write(p, f"refcoco/{p.name}")
    return buf.getvalue()


def test_zip_is_unpacked_into_the_refer_layout_and_prepare_reads_it(server, tmp_path):
    body = _refer_zip(tmp_path)
    root = tmp_path / "data"
    src = _source(server, "/refcoco.zip", body, name="refcoco", sha256=hashlib.sha256(body).hexdigest(),
                  extract_to=".", provides=("refcoco/refs(unc).p", "refcoco/instances.json"))
    r = dl.ensure(src, root, progress=False)
    assert r["status"] == "downloaded" and r["extracted_files"] == 2
    data = refer.load_refer(root, "refcoco", "unc")
    assert len(data.refs) == 2 and data.get_mask(data.refs[0]).sum() == 12
    assert dl.ensure(src, root, progress=False)["status"] == "present"  # nothing fetched twice
    assert dl.ensure(src, root, progress=False, verify_existing=True)["status"] == "verified"  # re-hashed
    (root / "downloads" / "refcoco.zip").write_bytes(body[:-1] + b"x")  # the kept archive rots on disk
    with pytest.raises(dl.ChecksumError, match="sha256 mismatch"):
        dl.ensure(src, root, progress=False, verify_existing=True)
    n_requests = len(server.requests)
    imgs = root / "images/mscoco/images/train2014"
    imgs.mkdir(parents=True)
    (imgs / "COCO_train2014_000000000005.jpg").write_bytes(b"jpg")
    stats = paper.prepare({"data_root": str(root), "datasets": [{"name": "refcoco", "split_by": "unc"}],
                        "pseudo_split": {"dataset": "refcoco", "split_by": "unc", "split": "train"}})
    assert len(server.requests) == n_requests
    assert stats["data.refcoco.train.refs"] == 1 and stats["data.refcoco.testA.sentences"] == 2
    assert stats["data.train2014_images"] == 1 and stats["data.pseudo_images"] == 1


def test_prepare_names_the_command_when_data_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m ris_utils download --what refcoco\+,coco-train2014"):
        paper.prepare({"data_root": str(tmp_path), "datasets": [{"name": "refcoco+", "split_by": "unc"}],
                    "download": False, "profile": "paper"})


def test_zip_member_outside_target_is_refused(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil.txt", "x")
    src = _source(server, "/evil.zip", buf.getvalue(), extract_to=".", provides=("ok",))
    with pytest.raises(dl.DownloadError, match="outside"):
        dl.ensure(src, tmp_path / "root", progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_what_names_and_groups():
    assert [s.name for s in dl.resolve_names("paper")] == list(dl.GROUPS["paper"])
    assert [s.name for s in dl.resolve_names("sam,refcoco")] == ["sam-vit-h", "refcoco"]
    with pytest.raises(ValueError, match="unknown item 'refclef'"):
        dl.resolve_names("refclef")
    for s in dl.SOURCES.values():  # every automatic entry is https/http with a file name and a target
        assert s.manual or (s.urls and s.filename and s.provides), s.name
        assert all(u.startswith(("http://", "https://")) for u in s.urls)
    assert os.fspath(dl.SOURCES["coco-train2014"].extract_to) == "images/mscoco/images"


def test_interrupted_unpacking_is_redone(server, tmp_path):
    body = _refer_zip(tmp_path)
    root = tmp_path / "data"
    src = _source(server, "/refcoco.zip", body, name="refcoco", extract_to=".",
                  provides=("refcoco/refs(unc).p", "refcoco/instances.json"))
    dl.ensure(src, root, progress=False)
    assert dl.is_present(src, root)
    (root / ".extracted" / "refcoco").unlink()  # as if the process died while unpacking
    (root / "refcoco" / "instances.json").write_text("{trunc")
    assert not dl.is_present(src, root)
    r = dl.ensure(src, root, progress=False)
    assert r["status"] == "verified"  # the kept archive is re-verified and unpacked again, no new download
    assert len(refer.load_refer(root, "refcoco", "unc").refs) == 2
    assert sum(p == "/refcoco.zip" for p, _ in server.requests) == 1


def test_dispatcher_maps_download(capsys):
    from ris_utils.__main__ import main

    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "sam-vit-h" in out and "coco-train2014" in out and "checksums.lock.json" in out


def test_prepare_downloads_what_is_missing_when_asked(server, tmp_path, monkeypatch):
    body = _refer_zip(tmp_path)
    server.files["/refcoco.zip"] = body
    monkeypatch.setitem(dl.SOURCES, "refcoco", dataclasses.replace(
        dl.SOURCES["refcoco"], urls=(server.url + "/refcoco.zip",), sha256=hashlib.sha256(body).hexdigest()))
    root = tmp_path / "data"
    cfg = {"data_root": str(root), "datasets": [{"name": "refcoco", "split_by": "unc"}], "need": ["refcoco"],
           "download": True, "progress": False}
    stats = paper.prepare(cfg)
    assert stats["data.refcoco.train.refs"] == 1 and stats["data.refcoco.testA.refs"] == 1
    assert json.loads((root / dl.LOCK_NAME).read_text())["refcoco"]["sha256"] == hashlib.sha256(body).hexdigest()
    paper.prepare(cfg)  # everything present: no second request
    assert [p for p, _ in server.requests] == ["/refcoco.zip"]


def test_unreachable_official_host_falls_back_to_the_mirror(server, tmp_path):
    body = _payload(2_000, seed=5)
    server.files["/mirror/r.zip"] = body
    dead = f"http://127.0.0.1:{_closed_port()}/r.zip"
    src = dl.Source(name="r", urls=(dead, server.url + "/mirror/r.zip"), filename="r.bin", dest="downloads",
                    sha256=hashlib.sha256(body).hexdigest())
    assert dl.ensure(src, tmp_path, progress=False)["status"] == "downloaded"
    src2 = dataclasses.replace(src, name="r2", urls=(dead, f"http://127.0.0.1:{_closed_port()}/r.zip"))
    with pytest.raises(dl.OfflineError, match="no URL reachable"):
        dl.ensure(src2, tmp_path / "other", progress=False)


def test_torn_download_is_never_accepted(server, tmp_path, monkeypatch):
    """Killed while verifying: the file has no final name yet, so the next run verifies it again (issue 11)."""
    body = _payload(30_000, seed=4)
    src = _source(server, "/ck.pth", body, dest="checkpoints", sha256=hashlib.sha256(body).hexdigest(),
                  provides=("checkpoints/ck.pth",))
    real = dl.file_digests

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies while hashing

    monkeypatch.setattr(dl, "file_digests", killed)
    with pytest.raises(KeyboardInterrupt):
        dl.ensure(src, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints" / "ck.pth").exists() and (tmp_path / "checkpoints" / "ck.pth.part").exists()
    monkeypatch.setattr(dl, "file_digests", real)
    assert not dl.is_present(src, tmp_path)
    r = dl.ensure(src, tmp_path, progress=False)
    assert r["status"] == "downloaded" and (tmp_path / "checkpoints" / "ck.pth").read_bytes() == body
    assert dl.ensure(src, tmp_path, progress=False)["status"] == "present"
    # wrong bytes at the final name without a verification record (an older version renamed before hashing)
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "ck.pth").write_bytes(body[:-1] + b"\x00")
    with pytest.raises(dl.ChecksumError, match="sha256 mismatch"):
        dl.ensure(src, other, progress=False)
    assert not (other / "checkpoints" / "ck.pth").exists()


def test_zip_unpacks_into_a_symlinked_folder_inside_the_data_root(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("train2014/COCO_train2014_000000000009.jpg", b"jpg")
    big_disk = tmp_path / "big_disk" / "train2014"
    big_disk.mkdir(parents=True)
    root = tmp_path / "root"
    (root / "images" / "mscoco" / "images").mkdir(parents=True)
    os.symlink(big_disk, root / "images" / "mscoco" / "images" / "train2014")
    src = _source(server, "/coco.zip", buf.getvalue(), extract_to="images/mscoco/images",
                  provides=("images/mscoco/images/train2014/COCO_train2014_000000000009.jpg",))
    r = dl.ensure(src, root, progress=False)
    assert r["extracted_files"] == 1 and (big_disk / "COCO_train2014_000000000009.jpg").read_bytes() == b"jpg"


def test_https_where_the_host_has_it():
    assert dl.SOURCES["coco-train2014"].urls[0].startswith("https://")
    assert all(u.startswith("https://") for u in dl.SOURCES["cutler"].urls)


def test_authors_coca_is_downloaded_recorded_and_is_the_paper_default(server, tmp_path):
    """issue 14 item 10: the authors' CC3M CoCa has a source entry (checksum recorded on first download,
    the second URL tried when the first 404s) and is the paper profile's captions.pretrained."""
    from ris_utils.profiles import step_config

    src = dl.SOURCES["coca-cc3m"]
    assert src.dest == "checkpoints" and not (src.sha256 or src.md5) and "coca-cc3m" in dl.GROUPS["paper"]
    assert all("huggingface.co/SeonghoonYu/pseudo-ris" in u for u in src.urls)
    body = _payload(4_000, seed=7)
    server.files["/logs/epoch_1.pt"] = body
    local = dataclasses.replace(src, urls=(server.url + "/epoch_1.pt", server.url + "/logs/epoch_1.pt"))
    r = dl.ensure(local, tmp_path, progress=False)
    assert r["status"] == "downloaded" and r["recorded"] is True
    assert (tmp_path / src.provides[0]).read_bytes() == body
    assert json.loads((tmp_path / dl.LOCK_NAME).read_text())["coca-cc3m"]["sha256"] == hashlib.sha256(body).hexdigest()
    cfg = step_config("paper", "captions")
    assert cfg["pretrained"].endswith("data/paper/" + src.provides[0])
    assert step_config("paper", "data")["need"][-1] == "coca-cc3m"


def test_missing_captioner_file_names_the_setting(tmp_path):
    from ris_utils.captioning.train import load_captioner

    with pytest.raises(FileNotFoundError, match="captions.pretrained .*does not exist.*coca-cc3m"):
        load_captioner({"tokenizer": "open_clip", "model": "coca_ViT-L-14",
                        "pretrained": str(tmp_path / "nowhere" / "epoch_1.pt"), "device": "cpu"})
