"""Downloads against a local HTTP server (full, interrupted + resumed, bad checksum) and safe tar extraction."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from llamalit.data.download import DownloadError, cached_download, download, extract_tar
from llamalit.data.prepare import load_manifest, prepare

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB, so the copy loop runs more than once
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_full_download_is_verified_and_cached(http_server, tmp_path):
    http_server.files["/files/blob.bin"] = PAYLOAD
    url = f"{http_server.url}/files/blob.bin"
    path = cached_download(url, tmp_path, sha256=SHA, progress=False)
    assert path == tmp_path / "downloads" / "blob.bin"
    assert path.read_bytes() == PAYLOAD
    assert list(path.parent.iterdir()) == [path]  # no .part left behind
    n = len(http_server.requests)
    assert cached_download(url, tmp_path, sha256=SHA, progress=False) == path
    assert len(http_server.requests) == n  # the cached file is reused without a request


def test_interrupted_download_resumes_with_range(http_server, tmp_path):
    http_server.files["/blob.bin"] = PAYLOAD
    http_server.cut["/blob.bin"] = 300_000
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="run again to resume"):
        download(f"{http_server.url}/blob.bin", dest, sha256=SHA, progress=False)
    part = tmp_path / "blob.bin.part"
    assert not dest.exists() and part.stat().st_size == 300_000
    download(f"{http_server.url}/blob.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert http_server.requests[-1] == ("/blob.bin", "bytes=300000-")


def test_server_ignoring_range_restarts_cleanly(http_server, tmp_path):
    http_server.files["/blob.bin"] = PAYLOAD
    http_server.ignore_range = True
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:1000])
    path = download(f"{http_server.url}/blob.bin", tmp_path / "blob.bin", sha256=SHA, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_wrong_checksum_leaves_nothing(http_server, tmp_path):
    http_server.files["/blob.bin"] = PAYLOAD
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        download(f"{http_server.url}/blob.bin", tmp_path / "blob.bin", sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_url_is_a_clear_error(http_server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404.*check the URL"):
        download(f"{http_server.url}/nope.tar.gz", tmp_path / "x", progress=False)
    assert list(tmp_path.iterdir()) == []


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def test_extract_plain_archive(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar([(_member("data00.json"), b"[]"), (_member("sub/data01.json"), b"[1]")]))
    out = extract_tar(archive, tmp_path / "out")
    assert (out / "data00.json").read_bytes() == b"[]" and (out / "sub" / "data01.json").read_bytes() == b"[1]"


@pytest.mark.parametrize("evil, match", [
    (_member("../escape.txt"), "outside the target"),
    (_member("/tmp/llamalit-absolute.txt"), "outside the target"),
    (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "refusing link"),
    (_member("hard", tarfile.LNKTYPE, "data00.json"), "refusing link"),
    (_member("dev", tarfile.CHRTYPE), "special file"),
])
def test_malicious_archive_is_refused_before_writing(tmp_path, evil, match):
    archive = tmp_path / "evil.tar.gz"
    data = b"x" if evil.type == tarfile.REGTYPE else None
    archive.write_bytes(_tar([(_member("data00.json"), b"[]"), (evil, data)]))
    with pytest.raises(DownloadError, match=match):
        extract_tar(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz"]  # no output, no temp dir
    assert not (tmp_path.parent / "escape.txt").exists() and not Path("/tmp/llamalit-absolute.txt").exists()


def test_prepare_from_a_tarball_url(http_server, tmp_path, synthetic_corpus, tiny_tokenizer):
    members = [(_member(f.name), f.read_bytes()) for f in synthetic_corpus]
    http_server.files["/TinyStories_all_data.tar.gz"] = _tar(members)
    cfg = {"kind": "pretrain", "source": f"{http_server.url}/TinyStories_all_data.tar.gz",
           "tokenizer": str(tiny_tokenizer.path), "dir": str(tmp_path / "shards"), "num_workers": 1}
    manifest = load_manifest(prepare(cfg, tmp_path / "cache"))
    assert [s["source"] for s in manifest["shards"]] == [f.name for f in synthetic_corpus]
    stories = sum(len(json.loads(f.read_text())) for f in synthetic_corpus)
    n_bos = sum(int((np.fromfile(s["tokens"], dtype=np.uint16) == tiny_tokenizer.bos_id).sum())
                for s in manifest["shards"])
    assert n_bos == stories  # one BOS per story
