"""MNIST, Fashion-MNIST (upstream IDX files) and FEMNIST (LEAF json, natural writer clients).

MNIST / Fashion-MNIST
---------------------
The four upstream IDX files (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`), gzip-compressed as published or
already decompressed (same names without `.gz`), are read with a strict IDX parser: magic
number, element type (unsigned byte), dimensions and the exact payload length are checked, so
a corrupt or truncated file raises `fedhpro.download.ArchiveError` instead of loading garbage.
The loader looks in `path=` (a folder) or else in `<root>/<name>/raw/` (where
`fedhpro.download.prepare` puts the downloads), `<root>/<name>/` and torchvision's
`<root>/<name>/{MNIST,FashionMNIST}/raw/`.

Upstream and checksums (md5 of the `.gz` files, as published and used by torchvision):
MNIST from torchvision's mirror of yann.lecun.com, https://ossci-datasets.s3.amazonaws.com/mnist/
(the original http://yann.lecun.com/exdb/mnist/ often refuses downloads; same files, same md5),
Fashion-MNIST from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (Zalando).
A local copy whose bytes differ (e.g. a recompressed `train-images-idx3-ubyte.gz`: the IDX bytes
inside are identical, the gzip container is not) is accepted through `prepare(...,
mirror={name: {"url": ..., "checksum": "md5:<the copy's md5>"}})`; the upstream md5 stays the
default check. Debian's `dataset-fashion-mnist` package is not needed (but its folder works as
`path=`).

Shapes: uint8 N x 1 x 28 x 28, labels 0..9; 60,000 train / 10,000 test. Normalisation:
MNIST mean 0.1307 / std 0.3081, Fashion-MNIST 0.2860 / 0.3530 (the usual published values);
no augmentation; default model `cnn`.

FEMNIST (LEAF)
--------------
LEAF (Caldas et al. 2018, https://github.com/TalwalkarLab/leaf) builds FEMNIST from NIST Special
Database 19 with its `preprocess.sh`; there is no published download of the resulting json, so
`femnist` has no `downloads`: run LEAF's `./preprocess.sh -s niid --sf 1.0 -k 0 -t sample` (or
any other LEAF setting) and point `path=` at, or copy into `<root>/femnist/`, the folder (or a
tar/zip of it) holding `train/*.json` and `test/*.json`. Every json file is

    {"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]], "y": [...]}}}

x: 28 x 28 grey values in [0, 1] (LEAF's scaling; 1.0 is the white paper background, kept as
is), stored as uint8 round(255 x); y: 62 classes (0-9, A-Z, a-z). Writers: the train files'
users in order of appearance (then test-only users) get ids 0..W-1; `train_domain` holds every
training sample's writer id and `domain_names` the writer names. `test_domain` is None: one
accuracy column per writer (thousands) would swamp the metrics.

The natural client split is by writer: use `partition: domains`. `fedhpro.partition.partition_domains`
gives every client whole writers when num_clients < writers (LEAF's split; see
`partition_writers`) and splits writers over `clients_per_domain` clients otherwise. The
DatasetSpec lists the single pseudo-domain "writers" so that the config accepts
`partition: domains` (the real domains are only known once the json is read). The decoded
arrays are cached as `<root>/femnist/cache/<key>.npz` (json parsing is slow). mean/std come
from the training images; default model `cnn`, no augmentation.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from fedhpro.lazy import lazy_module
from fedhpro.runio import atomic_savez
from fedhpro.data.registry import ArrayData, DatasetSpec, register
from fedhpro.data.imagefolder import cache_path, channel_stats
from fedhpro.download import ArchiveError, RemoteFile

torch = lazy_module("torch")

log = logging.getLogger(__name__)

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")
FASHION_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MD5 = ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
               "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")
MNIST_REMOTES = tuple(RemoteFile(MNIST_BASE + f, f, md5=m) for f, m in zip(IDX_FILES, MNIST_MD5))
FASHION_REMOTES = tuple(RemoteFile(FASHION_BASE + f, f, md5=m) for f, m in zip(IDX_FILES, FASHION_MD5))

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FEMNIST_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
CORRUPTION = (OSError, EOFError, zlib.error)


# ----------------------------------------------------------------------------- locating files


def search_dirs(root: Path, names: tuple[str, ...], path: str | Path | None = None,
                extra: tuple[str, ...] = ()) -> list[Path]:
    """Folders to look in: `path` alone if given (must exist), else `<root>/<n>/raw`, `<root>/<n>`
    (and `<root>/<n>/<e>` for e in extra) for every dataset name n."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"path {p} does not exist")
        return [p]
    out = []
    for n in names:
        base = Path(root) / n
        out += [base / "raw", base, *(base / e for e in extra)]
    return out


def find_file(dirs: list[Path], name: str, alternatives: tuple[str, ...] = ()) -> Path | None:
    """The first existing `<dir>/<name>` (or an alternative name), dirs in order."""
    for d in dirs:
        for n in (name, *alternatives):
            if (d / n).is_file():
                return d / n
    return None


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped/bunzipped by suffix; ArchiveError if the stream is corrupt or truncated."""
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as f:
            return f.read()
    except CORRUPTION as exc:
        raise ArchiveError(f"cannot read {path} (corrupt or truncated): {exc}") from exc


# ----------------------------------------------------------------------------- IDX


def parse_idx(data: bytes, what: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes (unsigned-byte element type only, as MNIST/Fashion-MNIST use)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ArchiveError(f"{what}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ArchiveError(f"{what}: IDX element type 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ArchiveError(f"{what}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise ArchiveError(f"{what}: IDX payload has {len(data) - header} bytes, its header {dims} says "
                           f"{expected} (corrupt or truncated)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def read_idx_dataset(dirs: list[Path], what: str, num_classes: int = 10) -> tuple[np.ndarray, ...]:
    """(train_x N x 1 x H x W, train_y, test_x, test_y) from the four IDX files in one of `dirs`."""
    arrays = []
    for d in dirs:
        files = [find_file([d], f, (f[:-3],)) for f in IDX_FILES]
        if all(files):
            break
    else:
        missing = ", ".join(IDX_FILES)
        raise FileNotFoundError(f"{what}: no IDX files ({missing}, or without .gz) in "
                                f"{', '.join(str(d) for d in dirs)}")
    for f in files:
        arrays.append(parse_idx(read_bytes(f), str(f)))
    tx, ty, vx, vy = arrays
    for x, y, split in ((tx, ty, "train"), (vx, vy, "test")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ArchiveError(f"{what}: {split} images {x.shape} and labels {y.shape} do not match")
        if len(y) and int(y.max()) >= num_classes:
            raise ArchiveError(f"{what}: {split} labels outside 0..{num_classes - 1}")
    log.info("%s: %d train / %d test images from %s", what, len(tx), len(vx), files[0].parent)
    return (np.ascontiguousarray(tx[:, None]), ty.astype(np.int64), np.ascontiguousarray(vx[:, None]),
            vy.astype(np.int64))


def _idx_loader(name: str, mean, std, class_names, torchvision_dir: str):
    def load(root: Path, path: str | None = None) -> ArrayData:
        tx, ty, vx, vy = read_idx_dataset(search_dirs(root, (name,), path, (f"{torchvision_dir}/raw",)), name)
        return ArrayData(train_x=torch.from_numpy(tx), train_y=torch.from_numpy(ty), test_x=torch.from_numpy(vx),
                         test_y=torch.from_numpy(vy), num_classes=10, mean=mean, std=std, class_names=class_names)

    load.__doc__ = f"Load {name} from its IDX files (path=: a folder holding them; see the module docstring)."
    return load


load_mnist = _idx_loader("mnist", MNIST_MEAN, MNIST_STD, tuple(str(d) for d in range(10)), "MNIST")
load_fashion_mnist = _idx_loader("fashion_mnist", FASHION_MEAN, FASHION_STD, FASHION_CLASSES, "FashionMNIST")


# ----------------------------------------------------------------------------- LEAF json (FEMNIST)


def _zip_read(source: Path, name: str) -> bytes:
    with zipfile.ZipFile(source) as zf:
        return zf.read(name)


def _json_members(source: Path) -> dict[str, list[tuple[str, Callable[[], bytes]]]]:
    """{'train': [(name, reader)], 'test': [...]} for the LEAF json files of a folder, tar or zip."""
    found: dict[str, list] = {"train": [], "test": []}

    def add(rel: str, reader) -> None:
        parts = PurePosixPath(rel).parts
        if (len(parts) >= 2 and parts[-2] in found and parts[-1].endswith(".json")
                and not any(p.startswith(".") or p == "__MACOSX" for p in parts)):
            found[parts[-2]].append((rel, reader))

    try:
        if source.is_dir():
            for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
                dirnames.sort()
                for fn in sorted(filenames):
                    full = Path(dirpath) / fn
                    add(full.relative_to(source).as_posix(), full.read_bytes)
        elif zipfile.is_zipfile(source) and not tarfile.is_tarfile(source):
            with zipfile.ZipFile(source) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and info.filename.endswith(".json"):
                        add(info.filename, lambda n=info.filename: _zip_read(source, n))  # lazily: files are big
        else:
            with tarfile.open(source, "r:*") as tf:
                for m in tf:
                    if m.isfile():
                        name = m.name[2:] if m.name.startswith("./") else m.name
                        if name.endswith(".json"):
                            data = tf.extractfile(m).read()
                            add(name, lambda b=data: b)
    except (tarfile.TarError, zipfile.BadZipFile, *CORRUPTION) as exc:
        raise ArchiveError(f"cannot read {source} (corrupt or truncated): {exc}") from exc
    for split in found:
        found[split].sort(key=lambda t: t[0])
    return found


def read_leaf(source: str | Path, pixels: int = 784) -> dict:
    """Read LEAF json splits: dict of train_x/train_y/train_w/test_x/test_y/test_w arrays and writers.

    x is uint8 N x 1 x 28 x 28 (round(255 * value)), w the writer index of every sample.
    """
    source = Path(source)
    members = _json_members(source)
    if not members["train"] or not members["test"]:
        raise FileNotFoundError(f"{source}: no LEAF json files in train/ and test/ folders")
    writers: dict[str, int] = {}
    out = {}
    for split in ("train", "test"):
        xs, ys, ws = [], [], []
        for name, reader in members[split]:
            try:
                doc = json.loads(reader())
            except (ValueError, zipfile.BadZipFile, *CORRUPTION) as exc:
                raise ArchiveError(f"{source}:{name} is not valid LEAF json (corrupt or truncated?): {exc}") from exc
            if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
                raise ValueError(f"{source}:{name}: not a LEAF json file (needs 'users' and 'user_data')")
            users = doc.get("users") or list(doc["user_data"])
            counts = doc.get("num_samples")
            for i, user in enumerate(users):
                entry = doc["user_data"].get(user)
                if entry is None:
                    raise ValueError(f"{source}:{name}: user {user!r} listed without user_data")
                x = np.asarray(entry.get("x", []), dtype=np.float32)
                y = np.asarray(entry.get("y", []), dtype=np.int64)
                if x.ndim != 2 or x.shape[1] != pixels or len(x) != len(y):
                    raise ValueError(f"{source}:{name}: user {user!r} has x {x.shape} and {len(y)} labels; "
                                     f"expected N x {pixels} and N labels")
                if counts is not None and i < len(counts) and int(counts[i]) != len(y):
                    raise ValueError(f"{source}:{name}: user {user!r} has {len(y)} samples, num_samples says "
                                     f"{counts[i]}")
                if len(y) and (y.min() < 0 or y.max() >= len(FEMNIST_CLASSES)):
                    raise ValueError(f"{source}:{name}: user {user!r} has labels outside 0..61")
                wid = writers.setdefault(str(user), len(writers))
                xs.append(np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8))
                ys.append(y)
                ws.append(np.full(len(y), wid, dtype=np.int64))
        side = int(round(pixels ** 0.5))
        x = np.concatenate(xs) if xs else np.zeros((0, pixels), np.uint8)
        out[f"{split}_x"] = x.reshape(-1, 1, side, side)
        out[f"{split}_y"] = np.concatenate(ys) if ys else np.zeros(0, np.int64)
        out[f"{split}_w"] = np.concatenate(ws) if ws else np.zeros(0, np.int64)
    out["writers"] = np.array(list(writers), dtype=str)
    return out


def _find_leaf_source(root: Path, path: str | None) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"femnist: path {p} does not exist")
        return p
    base = Path(root) / "femnist"
    for d in (base, base / "data", base / "raw"):
        if (d / "train").is_dir() and (d / "test").is_dir():
            return d
    for d in (base / "raw", base):
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_file() and p.name.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
                    return p
    raise FileNotFoundError(
        f"no FEMNIST LEAF data under {base}: run LEAF's data/femnist/preprocess.sh "
        "(https://github.com/TalwalkarLab/leaf) and copy its data/train/ and data/test/ folders (or an archive "
        f"of them) into {base}, or give path=")


def load_femnist(root: Path, path: str | None = None, cache: bool = True) -> ArrayData:
    """FEMNIST from LEAF json (see the module docstring); writers in `train_domain`."""
    source = _find_leaf_source(Path(root), path)
    cfile = cache_path(Path(root) / "femnist" / "cache", source, layout="leaf-femnist") if cache else None
    arrays = None
    if cfile is not None and cfile.is_file():
        try:
            with np.load(cfile, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s: %s", cfile, exc)
    if arrays is None:
        arrays = read_leaf(source)
        if cfile is not None:
            try:
                atomic_savez(cfile, arrays)
            except OSError as exc:
                log.warning("cannot write cache %s: %s", cfile, exc)
    if len(arrays["train_y"]) == 0:
        raise ValueError(f"{source}: no FEMNIST training samples")
    mean, std = channel_stats(arrays["train_x"])
    std = tuple(s if s > 0 else 1.0 for s in std)
    return ArrayData(train_x=torch.from_numpy(arrays["train_x"]), train_y=torch.from_numpy(arrays["train_y"]),
                     test_x=torch.from_numpy(arrays["test_x"]), test_y=torch.from_numpy(arrays["test_y"]),
                     num_classes=len(FEMNIST_CLASSES), mean=mean, std=std, class_names=FEMNIST_CLASSES,
                     train_domain=torch.from_numpy(arrays["train_w"]), test_domain=None,
                     domain_names=tuple(str(w) for w in arrays["writers"]))


register(DatasetSpec(name="mnist", num_classes=10, loader=load_mnist, default_model="cnn", default_augment="none",
                     train_size=60000, downloads=MNIST_REMOTES,
                     description="MNIST (upstream IDX), 28x28 grey, 60000 train / 10000 test"))
register(DatasetSpec(name="fashion_mnist", num_classes=10, loader=load_fashion_mnist, default_model="cnn",
                     default_augment="none", train_size=60000, downloads=FASHION_REMOTES,
                     description="Fashion-MNIST (upstream IDX), 28x28 grey, 60000 train / 10000 test"))
register(DatasetSpec(name="femnist", num_classes=62, loader=load_femnist, default_model="cnn", default_augment="none",
                     domains=("writers",),
                     description="FEMNIST from LEAF json (path=...; no download: LEAF preprocessing), 28x28 grey, "
                                 "62 classes; writers in train_domain (partition: domains = natural writer clients)"))
