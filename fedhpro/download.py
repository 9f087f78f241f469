"""Verified, resumable downloads and safe archive extraction.

The pipeline's download step fetches every `RemoteFile` of a dataset with
`prepare(...)` into `<root>/<name>/raw/`. The contract:

* `fetch` always verifies a checksum (md5 or sha256) before a file appears under
  its final name. It downloads into `<file>.part`, resumes an interrupted
  transfer with an HTTP `Range` request (starting over when the server answers
  200 instead of 206), retries network errors with exponential backoff, and only
  renames the verified `.part` into place (`os.replace`, atomic). A file that is
  already present and verifies is used without touching the network; one that
  fails verification is removed and downloaded again.
* A local copy whose bytes differ from upstream (a re-encoded archive, a
  recompressed file) is accepted by configuring its own checksum (`checksum=`
  override, or the `checksum` of a `mirror` entry in `prepare`); the upstream
  checksum is never skipped silently, and a file without any checksum is refused.
* `safe_extract` refuses archive members that could write outside the target
  (absolute paths, `..`, links leaving the target, links traversed by other
  members) and special files (devices, FIFOs); it extracts into a temporary
  sibling directory and renames it into place only when complete, with a
  `.complete` marker recording the archive's checksum, so a half-extracted
  directory never looks complete.

Mirrors: `mirror_url` (or a `mirror` mapping in `prepare`) points a file at
another location: an `http(s)://` or `file://` URL, or a plain local path. A
value ending in "/" is a base to which the file name is appended.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import http.client
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

log = logging.getLogger(__name__)

USER_AGENT = "fedhpro-download/0.1"
CHUNK = 1 << 20
COMPLETE_MARKER = ".complete"


class DownloadError(RuntimeError):
    """A file could not be downloaded (after all retries, or a permanent error)."""


class ChecksumError(DownloadError):
    """A downloaded file's checksum differs from the expected one."""


class ArchiveError(RuntimeError):
    """An archive is corrupt, truncated or of an unknown kind."""


class UnsafeArchiveError(ArchiveError):
    """An archive member could write outside the target directory, or is a special file."""


class _IncompleteDownload(OSError):
    """The server closed the connection before the announced number of bytes (retryable)."""


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file: where it lives, the name it is stored under, and its checksum."""

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None


# ----------------------------------------------------------------------------- checksums

_ALGOS = {"md5": 32, "sha256": 64}


def parse_checksum(text: str) -> tuple[str, str]:
    """'md5:<hex>' or 'sha256:<hex>' -> (algorithm, lowercase hex)."""
    algo, sep, digest = text.strip().partition(":")
    algo, digest = algo.lower(), digest.strip().lower()
    if not sep or algo not in _ALGOS or not re.fullmatch(f"[0-9a-f]{{{_ALGOS[algo]}}}", digest):
        raise ValueError(f"checksum must be 'md5:<32 hex>' or 'sha256:<64 hex>', got {text!r}")
    return algo, digest


def expected_checksum(remote: RemoteFile, override: str | None = None) -> tuple[str, str]:
    """The checksum a file must have: the override if given, else sha256, else md5."""
    if override:
        return parse_checksum(override)
    if remote.sha256:
        return parse_checksum(f"sha256:{remote.sha256}")
    if remote.md5:
        return parse_checksum(f"md5:{remote.md5}")
    raise ValueError(f"no checksum for {remote.filename} ({remote.url}); "
                     "give RemoteFile.md5/sha256 or a checksum override")


def file_checksum(path: str | Path, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def verify(path: str | Path, checksum: str) -> bool:
    """Whether `path` exists and has the checksum 'md5:...' / 'sha256:...'."""
    algo, digest = parse_checksum(checksum)
    return Path(path).is_file() and file_checksum(path, algo) == digest


# ----------------------------------------------------------------------------- fetch


def _to_url(location: str) -> str:
    """A URL, or a local path turned into a file:// URL."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location):
        return location
    return Path(location).expanduser().resolve().as_uri()


def source_url(remote: RemoteFile, mirror_url: str | None) -> str:
    if not mirror_url:
        return remote.url
    if mirror_url.endswith("/"):
        base = _to_url(mirror_url)
        return base + ("" if base.endswith("/") else "/") + urllib.parse.quote(remote.filename)
    return _to_url(mirror_url)


def _check_filename(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"invalid file name {name!r}")


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock), so two processes never write one .part."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _attempt(url: str, part: Path, timeout: float) -> bool:
    """One transfer into `part`; returns True when it continued an existing .part."""
    offset = part.stat().st_size if part.exists() else 0
    scheme = urllib.parse.urlparse(url).scheme.lower()
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset and scheme in ("http", "https"):
        req.add_header("Range", f"bytes={offset}-")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        status = getattr(resp, "status", None)
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        resumed = False
        if offset and status == 206:
            match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)  # a range we did not ask for: start over next time
                raise _IncompleteDownload(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            resumed = True
            mode = "ab"
            log.info("resuming %s at byte %d", url, offset)
        else:
            mode = "wb"  # 200 (or file://): the whole body, from the start
        received = 0
        # read1 returns what has arrived, so a stall or reset keeps the bytes already received
        read = getattr(resp, "read1", None) or resp.read
        with open(part, mode) as out:
            while chunk := read(CHUNK):
                out.write(chunk)
                received += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    if expected is not None and received < expected:
        raise _IncompleteDownload(f"connection closed after {received} of {expected} bytes")
    return resumed


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return 400 <= exc.code < 500 and exc.code not in (408, 416, 425, 429)
    if isinstance(exc, urllib.error.URLError):
        if isinstance(exc.reason, str) and exc.reason.startswith("unknown url type"):
            return True
        return isinstance(exc.reason, (FileNotFoundError, PermissionError, IsADirectoryError))
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, ValueError))


def _download(url: str, part: Path, *, retries: int, backoff: float, timeout: float) -> bool:
    """Transfer `url` into `part`, retrying; returns True if any attempt resumed a .part."""
    resumed_any = False
    attempt = 0
    while True:
        try:
            resumed_any |= _attempt(url, part, timeout)
            return resumed_any
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 416:
                part.unlink(missing_ok=True)  # our .part is not a prefix the server can continue
            if _is_permanent(exc):
                raise DownloadError(f"cannot download {url}: {exc}") from exc
            if attempt >= retries:
                raise DownloadError(f"cannot download {url} after {attempt + 1} attempts: {exc}") from exc
            delay = backoff * (2 ** attempt)
            log.warning("download of %s failed (%s); retry %d/%d in %.1fs", url, exc, attempt + 1, retries, delay)
            time.sleep(delay)
            attempt += 1


def fetch(remote: RemoteFile, dest_dir: str | Path, *, mirror_url: str | None = None,
          checksum: str | None = None, retries: int = 4, backoff: float = 0.5,
          timeout: float = 60) -> Path:
    """Download `remote` into `dest_dir/remote.filename`, verified; returns the path.

    mirror_url: fetch from here instead of `remote.url` (a URL, a local path, or a
        base ending in "/" to which the file name is appended).
    checksum: 'md5:<hex>' or 'sha256:<hex>' replacing the upstream checksum (for a
        mirror whose bytes differ from upstream). Without it the upstream sha256
        (else md5) is required; a file with no checksum at all is a ValueError.
    retries: retries after the first attempt on network errors, sleeping
        `backoff * 2**i` seconds before retry i; `timeout` is the socket timeout.

    Raises ChecksumError (naming the file and both checksums) when the bytes do
    not verify (the .part is deleted and nothing appears under the final name),
    DownloadError when the transfer keeps failing.
    """
    _check_filename(remote.filename)
    algo, digest = expected_checksum(remote, checksum)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / remote.filename
    part = dest_dir / (remote.filename + ".part")
    with _locked(dest_dir / f".{remote.filename}.lock"):
        if final.exists():
            if final.is_file() and file_checksum(final, algo) == digest:
                log.info("%s present and verified", final)
                return final
            log.warning("%s present but fails %s verification; downloading again", final, algo)
            if final.is_dir():
                shutil.rmtree(final)
            else:
                final.unlink()
        url = source_url(remote, mirror_url)
        restarted = False
        while True:
            log.info("downloading %s -> %s", url, final)
            resumed = _download(url, part, retries=retries, backoff=backoff, timeout=timeout)
            actual = file_checksum(part, algo)
            if actual == digest:
                os.replace(part, final)
                _fsync_dir(dest_dir)
                return final
            part.unlink(missing_ok=True)
            if resumed and not restarted:
                # the stale .part we continued may not have matched the server's file
                log.warning("%s: checksum mismatch after resuming; downloading from scratch", remote.filename)
                restarted = True
                continue
            raise ChecksumError(f"checksum mismatch for {remote.filename} (from {url}): "
                                f"expected {algo}:{digest}, got {algo}:{actual}")


def mirror_entry(mirror: Mapping | None, remote: RemoteFile) -> tuple[RemoteFile, str | None, str | None]:
    """Apply a `prepare` mirror mapping to one file -> (file, mirror_url, checksum)."""
    if not mirror:
        return remote, None, None
    entry = mirror.get(remote.filename)
    if entry is None:
        base = mirror.get("*")
        if base is None:
            return remote, None, None
        if not isinstance(base, str):
            raise ValueError("mirror['*'] must be a base URL or directory")
        return remote, base if base.endswith("/") else base + "/", None
    if isinstance(entry, str):
        return remote, entry, None
    if not isinstance(entry, Mapping):
        raise ValueError(f"mirror entry for {remote.filename} must be a URL or a mapping, got {entry!r}")
    unknown = set(entry) - {"url", "checksum", "filename"}
    if unknown:
        raise ValueError(f"mirror entry for {remote.filename}: unknown keys {sorted(unknown)}; "
                         "accepted: url, checksum, filename")
    if entry.get("filename"):
        remote = RemoteFile(remote.url, entry["filename"], remote.md5, remote.sha256)
    return remote, entry.get("url"), entry.get("checksum")


def mirror_checksum(remote: RemoteFile, mirror: Mapping | None = None) -> str | None:
    """The checksum `prepare` verifies `remote` against ('md5:<hex>' / 'sha256:<hex>'): the mirror entry's
    if it configures one, else the upstream one; None when there is neither (`prepare` refuses the file)."""
    target, _, checksum = mirror_entry(mirror, remote)
    if not checksum and not (target.sha256 or target.md5):
        return None
    algo, digest = expected_checksum(target, checksum)  # ValueError for a malformed configured checksum
    return f"{algo}:{digest}"


def prepare(remotes: list[RemoteFile] | tuple[RemoteFile, ...], root: str | Path, name: str, *,
            mirror: Mapping | None = None, **fetch_options) -> Path:
    """Fetch every file of dataset `name` into `root/name/raw/`; returns that directory.

    mirror maps a file name to a URL/path, or to {"url": ..., "checksum": "md5:...",
    "filename": ...} (a configured checksum for a copy whose bytes differ from
    upstream; `filename` stores it under another name); the key "*" gives a base
    URL/directory for every file not named. Extra keyword arguments go to `fetch`.
    """
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for remote in remotes:
        target, url, checksum = mirror_entry(mirror, remote)
        fetch(target, raw, mirror_url=url, checksum=checksum, **fetch_options)
    return raw


# ----------------------------------------------------------------------------- archives


def _member_parts(name: str, original: str) -> list[str]:
    """Normalised path components of a member name; refuses absolute paths and '..'."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"archive member {original!r} has an absolute path")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {original!r} has a '..' component")
    return parts


def _resolve(path: str, links: Mapping[str, str], max_hops: int = 64) -> str | None:
    """Resolve an archive-relative path through the archive's own symlinks.

    Returns the normalised path inside the target, or None if it leaves it.
    """
    todo = deque(p for p in path.split("/"))
    cur: list[str] = []
    hops = 0
    while todo:
        p = todo.popleft()
        if p in ("", "."):
            continue
        if p == "..":
            if not cur:
                return None
            cur.pop()
            continue
        cur.append(p)
        target = links.get("/".join(cur))
        if target is not None:
            hops += 1
            if hops > max_hops or target.startswith("/"):
                return None
            cur.pop()
            todo.extendleft(reversed(target.split("/")))
    return "/".join(cur)


@dataclass
class _Entry:
    name: str  # as stored
    parts: list[str]
    kind: str  # "file" | "dir" | "symlink" | "hardlink"
    link: str = ""


def _check_entries(entries: list[_Entry]) -> None:
    """Refuse anything that could land outside the target (see module docstring)."""
    links: dict[str, str] = {}
    for e in entries:
        if not e.parts:
            if e.kind == "dir":
                continue
            raise UnsafeArchiveError(f"archive member {e.name!r} has an empty path")
        if e.parts == [COMPLETE_MARKER]:
            raise UnsafeArchiveError(f"archive member {e.name!r} would forge the completion marker")
        if e.kind == "symlink":
            if not e.link or e.link.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", e.link):
                raise UnsafeArchiveError(f"archive member {e.name!r} is a symlink to an absolute path {e.link!r}")
            links["/".join(e.parts)] = e.link
    for e in entries:
        key = "/".join(e.parts)
        for i in range(1, len(e.parts)):
            if "/".join(e.parts[:i]) in links:
                raise UnsafeArchiveError(f"archive member {e.name!r} is written through a symlink")
        if key in links and e.kind != "symlink":
            raise UnsafeArchiveError(f"archive member {e.name!r} replaces a symlink of the same archive")
        if e.kind == "symlink":
            parent = "/".join(e.parts[:-1])
            if _resolve(f"{parent}/{e.link}" if parent else e.link, links) is None:
                raise UnsafeArchiveError(f"archive member {e.name!r} is a symlink pointing outside "
                                         f"the target ({e.link!r})")
        elif e.kind == "hardlink":
            try:
                link_parts = _member_parts(e.link, e.name)
            except UnsafeArchiveError:
                link_parts = None
            if not link_parts or _resolve("/".join(link_parts), links) is None:
                raise UnsafeArchiveError(f"archive member {e.name!r} is a hard link pointing outside "
                                         f"the target ({e.link!r})")


def _tar_entries(tf: tarfile.TarFile) -> list[_Entry]:
    entries = []
    for m in tf.getmembers():
        if m.isreg():
            kind = "file"
        elif m.isdir():
            kind = "dir"
        elif m.issym():
            kind = "symlink"
        elif m.islnk():
            kind = "hardlink"
        else:
            what = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "FIFO"}.get(m.type, f"special file (type {m.type!r})")
            raise UnsafeArchiveError(f"archive member {m.name!r} is a {what}")
        entries.append(_Entry(m.name, _member_parts(m.name, m.name), kind, m.linkname))
    return entries


def _zip_entries(zf: zipfile.ZipFile) -> list[tuple[_Entry, zipfile.ZipInfo]]:
    out = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if info.is_dir():
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "symlink"
        elif stat.S_IFMT(mode) == 0 or stat.S_ISREG(mode):  # no type bits: a plain file
            kind = "file"
        else:
            raise UnsafeArchiveError(f"archive member {info.filename!r} is a special file (mode {mode:o})")
        link = zf.read(info).decode("utf-8", "surrogateescape") if kind == "symlink" else ""
        out.append((_Entry(info.filename, _member_parts(info.filename, info.filename), kind, link), info))
    return out


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        _check_entries(_tar_entries(tf))
        if hasattr(tarfile, "data_filter"):
            try:  # the standard library's own 'data' filter as a second line of defence
                tf.extractall(dest, filter="data")
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(f"archive member {exc.tarinfo.name!r} refused: {exc}") from exc
        else:  # pragma: no cover - Python without extraction filters
            tf.extractall(dest)
        # tarfile stops at the end-of-archive blocks, so a compressed stream's trailing CRC is never
        # checked; read the stream to its end so a corrupted .tar.gz/.bz2/.xz raises here.
        if tf.fileobj is not None:
            while tf.fileobj.read(CHUNK):
                pass


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        entries = _zip_entries(zf)
        _check_entries([e for e, _ in entries])
        for e, info in entries:
            out = dest.joinpath(*e.parts) if e.parts else dest
            if e.kind == "dir":
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            if e.kind == "symlink":
                out.unlink(missing_ok=True)
                os.symlink(e.link, out)
            else:
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)


def archive_kind(archive: str | Path) -> str:
    """'zip' or 'tar' (any compression tarfile reads); ArchiveError otherwise."""
    archive = Path(archive)
    if archive.suffix.lower() == ".zip" and zipfile.is_zipfile(archive):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except (OSError, EOFError, tarfile.TarError):
        pass
    if zipfile.is_zipfile(archive):
        return "zip"
    raise ArchiveError(f"{archive} is not a readable tar or zip archive (corrupt or truncated?)")


def is_complete(target_dir: str | Path, checksum: str | None = None) -> bool:
    """Whether `target_dir` was fully extracted (optionally: from the archive with `checksum`)."""
    marker = Path(target_dir) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    return checksum is None or marker.read_text().strip() == checksum


def safe_extract(archive: str | Path, target_dir: str | Path) -> None:
    """Extract a tar (any compression) or zip archive into `target_dir`, safely and atomically.

    Members are checked before anything is written: absolute paths, '..'
    components, symlinks/hard links resolving outside the target, members
    written through a symlink and device files/FIFOs raise UnsafeArchiveError
    naming the member. A corrupt or truncated archive raises ArchiveError.
    Extraction goes to `target_dir.parent/.tmp-<name>-<random>`; the marker
    `.complete` (the archive's 'sha256:<hex>') is written into it and the whole
    directory is renamed to `target_dir` in one step, replacing an earlier,
    incomplete or different extraction. On any failure the temp directory is
    removed and `target_dir` is left as it was. If `target_dir` is already
    complete for this very archive, nothing is done.
    """
    archive, target_dir = Path(archive), Path(target_dir)
    checksum = "sha256:" + file_checksum(archive, "sha256")
    if is_complete(target_dir, checksum):
        return
    kind = archive_kind(archive)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target_dir.name}-", dir=target_dir.parent))
    try:
        try:
            (_extract_tar if kind == "tar" else _extract_zip)(archive, tmp)
        except (UnsafeArchiveError, ArchiveError):
            raise
        except Exception as exc:
            if not _is_corruption(exc):
                raise
            raise ArchiveError(f"cannot extract {archive} (corrupt or truncated): {exc}") from exc
        (tmp / COMPLETE_MARKER).write_text(checksum + "\n")
        old = None
        if target_dir.exists() or target_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".old-{target_dir.name}-", dir=target_dir.parent))
            os.replace(target_dir, old / "x")
        os.replace(tmp, target_dir)
        _fsync_dir(target_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_corruption(exc: BaseException) -> bool:
    """Errors that mean 'bad archive data' rather than 'cannot write here'."""
    if isinstance(exc, (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError)):
        return True
    # gzip.BadGzipFile and bz2's "Invalid data stream" are OSErrors without an errno
    return isinstance(exc, OSError) and exc.errno is None


_DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def decompress(src: str | Path, dst: str | Path) -> Path:
    """Decompress a single-file .gz/.bz2/.xz (not a tar) to `dst`, atomically; returns dst.

    Writes `dst.parent/.tmp-<name>-<random>` and renames it to `dst` only after the
    whole stream decoded; a truncated or corrupt file raises ArchiveError and
    leaves no `dst`.
    """
    src, dst = Path(src), Path(dst)
    opener = _DECOMPRESSORS.get(src.suffix.lower())
    if opener is None:
        raise ArchiveError(f"{src}: unknown compression {src.suffix!r}; expected .gz, .bz2 or .xz")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{dst.name}-", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, opener(src, "rb") as inp:
            shutil.copyfileobj(inp, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and _is_corruption(exc):
            raise ArchiveError(f"cannot decompress {src} (corrupt or truncated): {exc}") from exc
        raise
    return dst
