"""Bring-your-own image data: `train/<class>/*` and `test/<class>/*` in a folder or archive.

Layout (a directory, a tar of any compression, or a zip; the two split folders
may sit under one common prefix, e.g. `mydata/train/...` inside the archive):

    train/<class>/<image>      test/<class>/<image>      (`val/` is accepted if there is no `test/`)

* class index = position of the class folder name in the sorted train class
  names (as torchvision's ImageFolder); a test class absent from train is an error;
* samples are ordered by class, then by file name (string order), per split;
* images (.jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm; hidden files
  skipped) are decoded with PIL, converted to RGB (channels=3) or L (channels=1)
  and, when their size differs, resized (bilinear) to image_size x image_size;
  image_size=None keeps the original size, which must then be the same for all;
* tar members are read directly from the archive, no extraction needed.

Decoding many images is slow, so the decoded uint8 arrays are cached as
`<root>/<dataset>/cache/<key>.npz` (written atomically); the key hashes the
source's path, size, modification time, inode number and status-change time
(every file's, for a directory) and the decoding options, so a changed source is
decoded again, also one overwritten with other bytes of the same size whose
mtime was then restored (`os.utime`, `cp -p`, `rsync -a`): no user can set
the ctime, and every write, rename or chmod updates it.

Options are checked up front (`check_options`): image_size a positive integer or
None, channels 1 or 3; a file that is no image is named with its size.

The registered `imagefolder` dataset has `num_classes=0` in its DatasetSpec,
meaning "determined from the data at load time" (the loaded ArrayData carries
the real count); its mean/std are computed from the train split.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np

from fedhpro.lazy import lazy_module
from fedhpro.runio import atomic_savez
from fedhpro.data.registry import ArrayData, DatasetSpec, register

torch = lazy_module("torch")

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
CACHE_VERSION = 2  # 2: source keys hold inode and ctime


@dataclass
class FolderArrays:
    """Decoded splits: uint8 N x C x H x W images, int64 labels, sorted class names."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]


# ----------------------------------------------------------------------------- layout


def _is_image_name(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return PurePosixPath(rel).suffix.lower() in IMAGE_EXTENSIONS


def find_layout(names: Iterable[str]) -> tuple[str, str]:
    """From relative POSIX file names, find (prefix, test split name) of a train/test tree.

    prefix is "" or "a/b/" (the folder holding `train/` and `test/`). Raises
    ValueError when there is no such tree or when several are equally plausible.
    """
    splits_at: dict[tuple[str, ...], set[str]] = {}
    for rel in names:
        parts = PurePosixPath(rel).parts
        if len(parts) >= 3 and parts[-3] in ("train", "test", "val"):
            splits_at.setdefault(parts[:-3], set()).add(parts[-3])
    found = [(prefix, "test" if "test" in s else "val") for prefix, s in splits_at.items()
             if "train" in s and ("test" in s or "val" in s)]
    if not found:
        raise ValueError("no image-folder layout found: expected train/<class>/<image> and "
                         "test/<class>/<image> (or val/<class>/<image>)")
    found.sort(key=lambda f: (len(f[0]), f[0]))
    if len(found) > 1 and len(found[0][0]) == len(found[1][0]):
        raise ValueError("several image-folder trees found: "
                         + ", ".join("/".join(p) or "." for p, _ in found) + "; point path= at one of them")
    prefix, test = found[0]
    return ("/".join(prefix) + "/" if prefix else ""), test


def walk_files(source: Path):
    """(path, relative posix name) of every file under `source`, sorted, following directory links once.

    A symlink loop or a dangling link is a ValueError naming it (os.walk would skip or recurse into them).
    """
    source = Path(source)
    visited = {os.path.realpath(source)}

    def walk_error(err: OSError) -> None:
        raise ValueError(f"folder {source}: cannot read {err.filename}: {err.strerror or err}")

    for dirpath, dirnames, filenames in os.walk(source, followlinks=True, onerror=walk_error):
        kept = []
        for d in sorted(dirnames):
            if d.startswith(".") or d == "__MACOSX":
                continue
            link = os.path.join(dirpath, d)
            real = os.path.realpath(link)
            if real in visited:
                raise ValueError(f"folder {source}: symlink loop at {link} (it leads back to {real}); remove the link")
            visited.add(real)
            kept.append(d)
        dirnames[:] = kept
        for fn in sorted(filenames):
            full = Path(dirpath) / fn
            if not full.exists():  # a link to nothing, or a loop of links
                target = os.readlink(full) if full.is_symlink() else "?"
                raise ValueError(f"folder {source}: {full} is a dangling or looping symlink (-> {target}); fix or "
                                 "remove it")
            yield full, full.relative_to(source).as_posix()


def collect_files(source: Path) -> dict[str, Callable[[], bytes]]:
    """Relative name -> reader of the bytes, for every image-like file of a dir/tar/zip."""
    if source.is_dir():
        out: dict[str, Callable[[], bytes]] = {}
        for full, rel in walk_files(source):
            if _is_image_name(rel):
                out[rel] = full.read_bytes
        return out
    if not source.is_file():
        raise FileNotFoundError(f"image folder {source} does not exist")
    if zipfile.is_zipfile(source) and not tarfile.is_tarfile(source):
        with zipfile.ZipFile(source) as zf:
            return {info.filename: (lambda b=zf.read(info): b) for info in zf.infolist()
                    if not info.is_dir() and _is_image_name(info.filename)}
    if not tarfile.is_tarfile(source):
        raise ValueError(f"{source} is neither a directory, a tar nor a zip archive")
    out = {}
    with tarfile.open(source, "r:*") as tf:  # one sequential pass: cheap for compressed tars too
        for m in tf:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and _is_image_name(name):
                data = tf.extractfile(m).read()
                out[name] = lambda b=data: b
    return out


# ----------------------------------------------------------------------------- decoding


def check_options(image_size, channels) -> tuple[int | None, int]:
    """(image_size, channels) as Python ints; a one-line ValueError naming an option of the wrong kind (checked
    before any image is read)."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
                                   or image_size < 1):
        raise ValueError(f"dataset option image_size must be a positive integer or null (original size), "
                         f"got {image_size!r}")
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels not in (1, 3):
        raise ValueError(f"dataset option channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return (None if image_size is None else int(image_size)), int(channels)


def decode_image(data: bytes, image_size: int | None, channels: int, name: str = "") -> np.ndarray:
    """PIL-decode image bytes to uint8 C x H x W (RGB for channels=3, L for 1)."""
    from PIL import Image, UnidentifiedImageError

    check_options(image_size, channels)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if image_size and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:  # its text names the BytesIO object by its address
        raise ValueError(f"cannot decode image {name or '<bytes>'}: not an image file ({len(data)} bytes)") from None
    except Exception as exc:  # PIL raises several kinds for undecodable data
        why = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(exc).split())) or type(exc).__name__
        raise ValueError(f"cannot decode image {name or '<bytes>'}: {why} ({len(data)} bytes)") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image_folder(source: str | Path, *, image_size: int | None = 32, channels: int = 3) -> FolderArrays:
    """Decode a train/test image-folder tree from a directory, tar or zip (see module docstring)."""
    image_size, channels = check_options(image_size, channels)
    source = Path(source)
    files = collect_files(source)
    prefix, test_split = find_layout(files)
    samples: dict[str, list[tuple[str, str]]] = {"train": [], test_split: []}
    for rel in files:
        if not rel.startswith(prefix):
            continue
        parts = rel[len(prefix):].split("/")
        if len(parts) == 3 and parts[0] in samples:
            samples[parts[0]].append((parts[1], parts[2]))
    class_names = tuple(sorted({c for c, _ in samples["train"]}))
    unknown = sorted({c for c, _ in samples[test_split]} - set(class_names))
    if unknown:
        raise ValueError(f"{source}: {test_split} classes {unknown} have no train images")
    index = {c: i for i, c in enumerate(class_names)}
    arrays = []
    for split in ("train", test_split):
        items = sorted(samples[split], key=lambda s: (index[s[0]], s[1]))
        x, shape = None, None
        for i, (cls, fn) in enumerate(items):
            rel = f"{prefix}{split}/{cls}/{fn}"
            img = decode_image(files[rel](), image_size, channels, f"{source}:{rel}")
            if x is None:
                shape = img.shape
                x = np.empty((len(items), *shape), dtype=np.uint8)
            elif img.shape != shape:
                raise ValueError(f"{source}:{rel} has size {img.shape[1:]}, others {shape[1:]}; "
                                 "give image_size to resize")
            x[i] = img
        if x is None:
            size = image_size or 0
            x = np.empty((0, channels, size, size), dtype=np.uint8)
        arrays += [x, np.array([index[c] for c, _ in items], dtype=np.int64)]
    log.info("%s: %d train / %d test images, %d classes", source, len(arrays[0]), len(arrays[2]),
             len(class_names))
    return FolderArrays(*arrays, class_names=class_names)


# ----------------------------------------------------------------------------- cache


def source_key(source: str | Path) -> dict:
    """What identifies a source's bytes cheaply: path, then size, mtime, inode and ctime (of every file, for a
    dir). The mtime can be set back (`os.utime`, `cp -p`, `rsync -a`) after other bytes of the same size were
    written; the ctime cannot (every write or chmod updates it), and a file replaced by a rename has another
    inode."""
    source = Path(source).resolve()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_dir():
        h = hashlib.sha256()
        for full, rel in walk_files(source):
            st = os.stat(full)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}\n".encode())
        return {"path": str(source), "tree": h.hexdigest()}
    st = source.stat()
    return {"path": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "ctime_ns": st.st_ctime_ns}


def cache_path(cache_dir: Path, source: str | Path, **options) -> Path:
    key = json.dumps({"v": CACHE_VERSION, "source": source_key(source), **options}, sort_keys=True)
    return Path(cache_dir) / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")


def save_npz(path: Path, arrays: FolderArrays) -> None:
    atomic_savez(path, dict(train_x=arrays.train_x, train_y=arrays.train_y, test_x=arrays.test_x,
                            test_y=arrays.test_y, class_names=np.array(arrays.class_names, dtype=str)))


def load_npz(path: Path) -> FolderArrays:
    with np.load(path, allow_pickle=False) as z:
        return FolderArrays(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                            tuple(str(c) for c in z["class_names"]))


def read_image_folder_cached(source: str | Path, cache_dir: Path | None, *, image_size: int | None = 32,
                             channels: int = 3) -> FolderArrays:
    """`read_image_folder`, reusing/writing `cache_dir/<key>.npz` (no cache when cache_dir is None)."""
    image_size, channels = check_options(image_size, channels)
    if cache_dir is None:
        return read_image_folder(source, image_size=image_size, channels=channels)
    path = cache_path(cache_dir, source, image_size=image_size, channels=channels)
    if path.is_file():
        try:
            return load_npz(path)
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s: %s", path, exc)
    arrays = read_image_folder(source, image_size=image_size, channels=channels)
    try:
        save_npz(path, arrays)
    except OSError as exc:
        log.warning("cannot write cache %s: %s", path, exc)
    return arrays


# ----------------------------------------------------------------------------- dataset


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 N x C x H x W images on the [0, 1] scale (exact, low memory)."""
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / 255.0
    for c in range(x.shape[1]):
        counts = np.bincount(np.ascontiguousarray(x[:, c]).ravel(), minlength=256).astype(np.float64)
        n = counts.sum()
        mean = float((counts * values).sum() / n) if n else 0.0
        var = float((counts * (values - mean) ** 2).sum() / n) if n else 0.0
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5)
    return tuple(means), tuple(stds)


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def find_folder_source(base: Path) -> Path | None:
    """A directory holding train/ and test/ (or val/), or an archive, at or just below `base`."""
    if not base.is_dir():
        return None
    candidates = [base] + sorted(p for p in base.iterdir() if p.is_dir() and p.name not in ("cache", "raw")
                                 and not p.name.startswith("."))
    for d in candidates:
        if (d / "train").is_dir() and ((d / "test").is_dir() or (d / "val").is_dir()):
            return d
    for d in (base, base / "raw"):
        if d.is_dir():
            archives = sorted(p for p in d.iterdir() if is_archive(p) and not p.name.startswith("."))
            if archives:
                return archives[0]
    return None


def load_imagefolder(root: Path, path: str | None = None, image_size: int | None = 32, channels: int = 3,
                     cache: bool = True, **_) -> ArrayData:
    """Load a user's train/test image-folder tree (dir, tar or zip).

    path: the folder or archive; default: found under `<root>/imagefolder/`
    (itself, a subfolder, or an archive there or in its raw/). The decoded
    arrays are cached under `<root>/imagefolder/cache/` unless cache=False.
    """
    image_size, channels = check_options(image_size, channels)
    if not isinstance(cache, bool):
        raise ValueError(f"dataset option cache must be true or false, got {cache!r}")
    base = Path(root) / "imagefolder"
    source = Path(path).expanduser() if path else find_folder_source(base)
    if source is None:
        raise FileNotFoundError(f"no image folder found under {base}; give path= (a folder or archive "
                                "with train/<class>/* and test/<class>/*)")
    if not source.exists():
        raise FileNotFoundError(f"image folder {source} does not exist")
    arrays = read_image_folder_cached(source, base / "cache" if cache else None,
                                      image_size=image_size, channels=channels)
    if len(arrays.train_x) == 0:
        raise ValueError(f"{source}: no training images")
    if len(arrays.class_names) < 2:  # one class trains to accuracy 1.0 and means nothing
        raise ValueError(f"{source}: {len(arrays.class_names)} class folder(s) "
                         f"({', '.join(arrays.class_names) or 'none'}) under train/; a classifier needs at least 2")
    mean, std = channel_stats(arrays.train_x)
    std = tuple(s if s > 0 else 1.0 for s in std)
    return ArrayData(train_x=torch.from_numpy(arrays.train_x), train_y=torch.from_numpy(arrays.train_y),
                     test_x=torch.from_numpy(arrays.test_x), test_y=torch.from_numpy(arrays.test_y),
                     num_classes=len(arrays.class_names), mean=mean, std=std, class_names=arrays.class_names)


register(DatasetSpec(name="imagefolder", num_classes=0, loader=load_imagefolder, default_model="resnet10",
                     default_augment="none",
                     description="your own images: train/<class>/* and test/<class>/* in a folder, tar or "
                                 "zip (path=...); num_classes=0 means: from the data at load time"))
