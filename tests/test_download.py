"""fedhpro.download against a real loopback HTTP server and hand-built malicious archives."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from fedhpro.download import (ArchiveError, ChecksumError, DownloadError, RemoteFile, UnsafeArchiveError,
                              decompress, fetch, file_checksum, is_complete, prepare, safe_extract, verify)

DATA = os.urandom(300_000) + b"end"
MD5 = hashlib.md5(DATA).hexdigest()
SHA256 = hashlib.sha256(DATA).hexdigest()


def remote_for(srv, path="/files/blob.bin", **kw) -> RemoteFile:
    return RemoteFile(url=srv.url(path), filename="blob.bin", **({"md5": MD5} | kw))


def no_leftovers(d: Path) -> bool:
    return not any(p.name.endswith(".part") or p.name.startswith(".tmp-") for p in d.iterdir())


# ----------------------------------------------------------------------------- fetch


def test_fetch_downloads_and_verifies(server, tmp_path):
    server.add("/files/blob.bin", DATA)
    path = fetch(remote_for(server), tmp_path / "raw", backoff=0)
    assert path == tmp_path / "raw" / "blob.bin"
    assert path.read_bytes() == DATA
    assert no_leftovers(path.parent)
    assert [r.method for r in server.requests] == ["GET"]
    assert "Range" not in server.requests[0].headers


def test_fetch_sha256_preferred_and_verify_helper(server, tmp_path):
    server.add("/files/blob.bin", DATA)
    path = fetch(remote_for(server, md5=None, sha256=SHA256), tmp_path, backoff=0)
    assert verify(path, f"sha256:{SHA256}") and verify(path, f"md5:{MD5}")
    assert not verify(path, "md5:" + "0" * 32)


def test_checksum_mismatch_names_both_and_leaves_nothing(server, tmp_path):
    server.add("/files/blob.bin", DATA)
    wrong = "0123456789abcdef" * 2
    with pytest.raises(ChecksumError) as err:
        fetch(remote_for(server, md5=wrong), tmp_path, backoff=0)
    msg = str(err.value)
    assert "blob.bin" in msg and wrong in msg and MD5 in msg
    assert not (tmp_path / "blob.bin").exists()
    assert not (tmp_path / "blob.bin.part").exists()
    assert not (tmp_path / ".complete").exists()
    assert no_leftovers(tmp_path)


def test_missing_checksum_is_an_error(server, tmp_path):
    server.add("/files/blob.bin", DATA)
    with pytest.raises(ValueError, match="no checksum"):
        fetch(RemoteFile(server.url("/files/blob.bin"), "blob.bin"), tmp_path)
    with pytest.raises(ValueError, match="checksum must be"):
        fetch(remote_for(server), tmp_path, checksum="crc32:1234")
    assert server.requests == []


def test_truncated_transfer_is_resumed_with_range(server, tmp_path):
    server.add("/files/blob.bin", DATA, plan=["truncate"])
    path = fetch(remote_for(server), tmp_path, retries=2, backoff=0)
    assert path.read_bytes() == DATA
    seen = server.requests_for("/files/blob.bin")
    assert [r.mode for r in seen] == ["truncate", "ok"]
    assert "Range" not in seen[0].headers
    assert seen[1].headers["Range"] == f"bytes={len(DATA) // 2}-"
    assert no_leftovers(tmp_path)


def test_stalled_transfer_times_out_and_resumes(server, tmp_path):
    server.add("/files/blob.bin", DATA, plan=["stall"])
    # the server stalls 2 s (tests/conftest.py): a 1 s read timeout fires with a margin on a loaded machine
    path = fetch(remote_for(server), tmp_path, retries=1, backoff=0, timeout=1.0)
    assert path.read_bytes() == DATA
    assert server.requests_for("/files/blob.bin")[1].headers["Range"] == f"bytes={len(DATA) // 2}-"


def test_server_errors_are_retried(server, tmp_path):
    server.add("/files/blob.bin", DATA, plan=["500", "truncate", "500"])
    assert fetch(remote_for(server), tmp_path, retries=3, backoff=0.01).read_bytes() == DATA
    assert len(server.requests) == 4


def test_always_failing_server_raises_after_retries(server, tmp_path):
    server.add("/files/blob.bin", DATA, default="truncate")
    with pytest.raises(DownloadError, match="after 3 attempts") as err:
        fetch(remote_for(server), tmp_path, retries=2, backoff=0)
    assert not isinstance(err.value, ChecksumError)
    assert len(server.requests) == 3
    assert not (tmp_path / "blob.bin").exists()


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        fetch(remote_for(server, path="/missing"), tmp_path, retries=3, backoff=0)
    assert len(server.requests) == 1


def test_resume_from_existing_part_uses_range(server, tmp_path):
    server.add("/files/blob.bin", DATA)
    (tmp_path / "blob.bin.part").write_bytes(DATA[:1234])
    assert fetch(remote_for(server), tmp_path, backoff=0).read_bytes() == DATA
    (req,) = server.requests
    assert req.headers["Range"] == "bytes=1234-"
    assert not (tmp_path / "blob.bin.part").exists()


def test_server_ignoring_range_starts_over(server, tmp_path):
    server.add("/files/blob.bin", DATA, default="ignore_range")
    (tmp_path / "blob.bin.part").write_bytes(DATA[:1234])
    assert fetch(remote_for(server), tmp_path, backoff=0).read_bytes() == DATA
    assert len(server.requests) == 1 and server.requests[0].headers["Range"] == "bytes=1234-"


def test_stale_part_is_discarded_after_mismatch(server, tmp_path):
    server.add("/files/blob.bin", DATA)
    (tmp_path / "blob.bin.part").write_bytes(b"garbage from another file")
    assert fetch(remote_for(server), tmp_path, backoff=0).read_bytes() == DATA
    seen = server.requests
    assert len(seen) == 2 and "Range" in seen[0].headers and "Range" not in seen[1].headers


def test_existing_verified_file_is_not_refetched(server, tmp_path):
    server.add("/files/blob.bin", DATA)
    (tmp_path / "blob.bin").write_bytes(DATA)
    mtime = (tmp_path / "blob.bin").stat().st_mtime_ns
    assert fetch(remote_for(server), tmp_path) == tmp_path / "blob.bin"
    assert server.requests == []
    assert (tmp_path / "blob.bin").stat().st_mtime_ns == mtime


def test_existing_bad_file_is_replaced(server, tmp_path):
    server.add("/files/blob.bin", DATA)
    (tmp_path / "blob.bin").write_bytes(b"corrupted copy")
    assert fetch(remote_for(server), tmp_path, backoff=0).read_bytes() == DATA
    assert len(server.requests) == 1


def test_mirror_url_and_checksum_override(server, tmp_path):
    other = b"a re-encoded local copy" * 1000
    server.add("/mirror/blob.bin", other)
    upstream = RemoteFile("http://127.0.0.1:9/unreachable/blob.bin", "blob.bin", md5=MD5)
    # the mirror's bytes differ from upstream: refused without an override ...
    with pytest.raises(ChecksumError):
        fetch(upstream, tmp_path / "a", mirror_url=server.url("/mirror/blob.bin"), backoff=0)
    # ... accepted with its own configured checksum, full URL or base URL
    override = "sha256:" + hashlib.sha256(other).hexdigest()
    p = fetch(upstream, tmp_path / "b", mirror_url=server.url("/mirror/blob.bin"), checksum=override)
    assert p.read_bytes() == other
    p = fetch(upstream, tmp_path / "c", mirror_url=server.url("/mirror/"), checksum=override.upper()
              .replace("SHA256", "sha256"))
    assert p.read_bytes() == other
    assert {r.path for r in server.requests} == {"/mirror/blob.bin"}


def test_file_urls_and_local_paths(tmp_path):
    src = tmp_path / "src" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(DATA)
    r = RemoteFile(src.as_uri(), "blob.bin", md5=MD5)
    assert fetch(r, tmp_path / "a").read_bytes() == DATA
    r2 = RemoteFile("https://example.invalid/blob.bin", "blob.bin", md5=MD5)
    assert fetch(r2, tmp_path / "b", mirror_url=str(src)).read_bytes() == DATA
    assert fetch(r2, tmp_path / "c", mirror_url=str(src.parent) + "/").read_bytes() == DATA
    with pytest.raises(DownloadError):  # a missing local file is permanent: no retries
        fetch(r2, tmp_path / "d", mirror_url=str(tmp_path / "nope.bin"), backoff=10)


def test_prepare_fetches_all_into_raw_with_mirror_mapping(server, tmp_path):
    a, b = b"first file" * 100, b"second file" * 100
    server.add("/m/a.bin", a)
    server.add("/m/b-local.bin", b)
    remotes = [RemoteFile("http://127.0.0.1:9/a.bin", "a.bin", md5=hashlib.md5(a).hexdigest()),
               RemoteFile("http://127.0.0.1:9/b.bin", "b.bin", md5="f" * 32)]
    mirror = {"*": server.url("/m/"),
              "b.bin": {"url": server.url("/m/b-local.bin"), "checksum": "md5:" + hashlib.md5(b).hexdigest()}}
    raw = prepare(remotes, tmp_path, "toy", mirror=mirror, backoff=0)
    assert raw == tmp_path / "toy" / "raw"
    assert (raw / "a.bin").read_bytes() == a and (raw / "b.bin").read_bytes() == b
    with pytest.raises(ValueError, match="unknown keys"):
        prepare(remotes, tmp_path, "toy2", mirror={"a.bin": {"md5": "x"}})


# ----------------------------------------------------------------------------- archives


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if data else None)


def make_tar(path: Path, members: list[tuple], mode="w") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            _add(tf, *m[:2], **(m[2] if len(m) > 2 else {}))
    return path


GOOD = [("pkg/a.txt", b"hello"), ("pkg/sub/b.txt", b"world"),
        ("pkg/link", b"", {"type": tarfile.SYMTYPE, "linkname": "sub/b.txt"}),
        ("pkg/hard", b"", {"type": tarfile.LNKTYPE, "linkname": "pkg/a.txt"})]

MALICIOUS = {
    "absolute": [("ok.txt", b"x"), ("/tmp/evil.txt", b"evil")],
    "dotdot": [("ok.txt", b"x"), ("../evil", b"evil")],
    "dotdot_nested": [("a/../../evil", b"evil")],
    "symlink_etc": [("ok.txt", b"x"), ("etc", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc"})],
    "symlink_up": [("d/up", b"", {"type": tarfile.SYMTYPE, "linkname": "../../outside"})],
    "symlink_chain": [("a", b"", {"type": tarfile.SYMTYPE, "linkname": "."}),
                      ("b", b"", {"type": tarfile.SYMTYPE, "linkname": "a/.."})],
    "write_through_symlink": [("d", b"", {"type": tarfile.SYMTYPE, "linkname": "."}),
                              ("d/x.txt", b"x")],
    "hardlink_outside": [("ok.txt", b"x"), ("h", b"", {"type": tarfile.LNKTYPE, "linkname": "../outside.txt"})],
    "hardlink_abs": [("h", b"", {"type": tarfile.LNKTYPE, "linkname": "/etc/passwd"})],
    "chardev": [("ok.txt", b"x"), ("dev/null", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})],
    "blockdev": [("sda", b"", {"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0})],
    "fifo": [("pipe", b"", {"type": tarfile.FIFOTYPE})],
    "marker_forgery": [(".complete", b"sha256:" + b"0" * 64)],
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_safe_extract_refuses_malicious_tar(case, tmp_path):
    members = MALICIOUS[case]
    archive = make_tar(tmp_path / f"{case}.tar", members)
    (tmp_path / "outside.txt").write_text("keep me")
    target = tmp_path / "work" / "out"
    target.parent.mkdir()
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, target)
    bad_name = members[-1][0]
    assert bad_name.lstrip("/") in str(err.value) or bad_name in str(err.value)
    assert not target.exists()
    assert not is_complete(target)
    assert list(target.parent.iterdir()) == []  # no temp dir left behind
    assert (tmp_path / "outside.txt").read_text() == "keep me"
    assert not (tmp_path / "evil").exists()


def test_safe_extract_good_tar_gz_and_marker(tmp_path):
    archive = make_tar(tmp_path / "good.tar.gz", GOOD, mode="w:gz")
    target = tmp_path / "out"
    safe_extract(archive, target)
    assert (target / "pkg" / "a.txt").read_bytes() == b"hello"
    assert (target / "pkg" / "link").read_bytes() == b"world" and (target / "pkg" / "link").is_symlink()
    assert (target / "pkg" / "hard").read_bytes() == b"hello"
    checksum = "sha256:" + file_checksum(archive)
    assert is_complete(target) and is_complete(target, checksum)
    assert (target / ".complete").read_text().strip() == checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.tar.gz", "out"]
    # idempotent: a second call with the same archive leaves the tree alone
    (target / "pkg" / "extra").write_text("kept")
    safe_extract(archive, target)
    assert (target / "pkg" / "extra").exists()
    # a different archive replaces the earlier extraction as a whole
    other = make_tar(tmp_path / "other.tar.bz2", [("new.txt", b"new")], mode="w:bz2")
    safe_extract(other, target)
    assert sorted(p.name for p in target.iterdir()) == [".complete", "new.txt"]
    assert is_complete(target, "sha256:" + file_checksum(other)) and not is_complete(target, checksum)


def test_safe_extract_truncated_tar_gz(tmp_path):
    big = [(f"pkg/f{i}.bin", os.urandom(50_000)) for i in range(6)]
    full = make_tar(tmp_path / "full.tar.gz", big, mode="w:gz").read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(full[: len(full) // 2])
    target = tmp_path / "out"
    with pytest.raises(ArchiveError):
        safe_extract(truncated, target)
    assert not target.exists() and not is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.tar.gz", "truncated.tar.gz"]


def test_safe_extract_replaces_incomplete_dir(tmp_path):
    archive = make_tar(tmp_path / "good.tar", GOOD)
    target = tmp_path / "out"
    (target / "pkg").mkdir(parents=True)
    (target / "pkg" / "half.txt").write_text("left by a killed extraction")
    assert not is_complete(target)
    safe_extract(archive, target)
    assert is_complete(target) and not (target / "pkg" / "half.txt").exists()


def test_safe_extract_zip(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("d/a.txt", b"alpha")
        zf.writestr("d/e/", b"")
    safe_extract(good, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "a.txt").read_bytes() == b"alpha" and is_complete(tmp_path / "out")
    for name in ("../evil.txt", "/abs.txt", "a/../../evil.txt"):
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("fine.txt", b"x")
            zf.writestr(zipfile.ZipInfo(name), b"evil")
        target = tmp_path / "bad_out"
        with pytest.raises(UnsafeArchiveError, match="evil|abs"):
            safe_extract(bad, target)
        assert not target.exists()
    link = zipfile.ZipInfo("l")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, b"/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        safe_extract(tmp_path / "link.zip", tmp_path / "link_out")
    # not an archive at all
    (tmp_path / "junk.bin").write_bytes(b"\x00junk" * 100)
    with pytest.raises(ArchiveError):
        safe_extract(tmp_path / "junk.bin", tmp_path / "junk_out")
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_decompress_gz_bz2(tmp_path):
    payload = os.urandom(100_000)
    (tmp_path / "x.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "x.bz2").write_bytes(bz2.compress(payload))
    assert decompress(tmp_path / "x.gz", tmp_path / "out" / "x1").read_bytes() == payload
    assert decompress(tmp_path / "x.bz2", tmp_path / "out" / "x2").read_bytes() == payload
    for suffix, blob in ((".gz", gzip.compress(payload)), (".bz2", bz2.compress(payload))):
        bad = tmp_path / f"trunc{suffix}"
        bad.write_bytes(blob[: len(blob) // 2])
        with pytest.raises(ArchiveError):
            decompress(bad, tmp_path / "out" / f"bad{suffix}")
        assert not (tmp_path / "out" / f"bad{suffix}").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x1", "x2"]


def test_corrupted_gzip_crc_is_refused_without_completion_marker(tmp_path):
    """tarfile never reads a .tar.gz's CRC trailer on its own; safe_extract must still catch it."""
    import gzip
    import io
    import os
    import tarfile

    from fedhpro.download import ArchiveError, is_complete, safe_extract

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = os.urandom(100_000)
        info = tarfile.TarInfo("a/b.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    corrupted = bytearray(gzip.compress(buf.getvalue(), compresslevel=0))
    corrupted[-6] ^= 0xFF  # the CRC-32 trailer
    (tmp_path / "x.tar.gz").write_bytes(bytes(corrupted))
    with pytest.raises(ArchiveError, match="CRC"):
        safe_extract(tmp_path / "x.tar.gz", tmp_path / "out")
    assert not is_complete(tmp_path / "out")
    assert not (tmp_path / "out").exists()
