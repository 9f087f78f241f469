"""CIFAR-10 and CIFAR-100, from the upstream python archive or from image folders.

Two on-disk formats are read, without torchvision:

* "python": the upstream archive (`cifar-10-python.tar.gz` /
  `cifar-100-python.tar.gz`, as torchvision downloads it), read directly from the
  archive or from its extracted folder (`cifar-10-batches-py/data_batch_1..5`,
  `test_batch`, `batches.meta`; `cifar-100-python/train`, `test`, `meta`). The
  pickles are read with a restricted unpickler (numpy arrays, lists, bytes
  only). Training order is data_batch_1..5 concatenated, as torchvision's.
  CIFAR-100 uses the 100 fine labels.
* "folder": `train/<class>/*` and `test/<class>/*` images in a folder or a tar
  (read member by member, no extraction), e.g. the offline copy
  `cifar10-jpeg.tar`; decoded by `fedhpro.data.imagefolder`, class index =
  sorted folder names (for CIFAR-10/100 the upstream label order is
  alphabetical, so indices agree with upstream), cached as
  `<root>/<name>/cache/<key>.npz`.

Where the data is looked for: `path=` (an archive, a tar of image folders, or a
folder of either kind), else under `<root>/<name>/`: an extracted python folder,
the downloaded archive in `raw/` (where `fedhpro.download.prepare` puts it), an
image-folder tree, or any other archive there or in `raw/` (format detected from
its contents). `source="python"` / `"folder"` restricts the format.

Normalisation: mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010) for
both datasets, because the FedHPro official code uses these CIFAR-10 statistics
for CIFAR-100 as well (they are not CIFAR-100's own statistics).
"""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedhpro.data.registry import ArrayData, DatasetSpec, register
from fedhpro.data.imagefolder import (FolderArrays, cache_path, find_folder_source, is_archive,
                                      read_image_folder_cached)
from fedhpro.download import RemoteFile
from fedhpro.lazy import lazy_module

torch = lazy_module("torch")

log = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR10_REMOTE = RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                            md5="c58f30108f718f92721af3b95e74349a")
CIFAR100_REMOTE = RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                             "cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85")


@dataclass(frozen=True)
class CifarVariant:
    name: str
    num_classes: int
    remote: RemoteFile
    folder: str  # top folder inside the python archive
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes


VARIANTS = {
    "cifar10": CifarVariant("cifar10", 10, CIFAR10_REMOTE, "cifar-10-batches-py",
                            tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                            b"labels", b"label_names"),
    "cifar100": CifarVariant("cifar100", 100, CIFAR100_REMOTE, "cifar-100-python", ("train",), "test", "meta",
                             b"fine_labels", b"fine_label_names"),
}


# ----------------------------------------------------------------------------- python format


class _RestrictedUnpickler(pickle.Unpickler):
    """Only what the CIFAR pickles need: numpy arrays (and bytes made by Python 3 protocol 2)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR pickle refers to {module}.{name}, which is not allowed")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2: no deprecation warning
        return super().find_class(module, name)


def _unpickle(data: bytes, what: str) -> dict:
    """A CIFAR pickle as a dict with bytes keys. Upstream's pickles come from Python 2 (keys read as bytes
    with encoding="bytes"); a copy re-pickled by Python 3 (`pickle.dump` of a dict) has str keys, which are
    encoded to bytes here so both read alike (torchvision reads either with encoding="latin1")."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise ValueError(f"cannot read CIFAR pickle {what}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR pickle {what} is not a dict")
    return {k.encode("latin1") if isinstance(k, str) else k: v for k, v in obj.items()}


def _python_members(v: CifarVariant) -> tuple[str, ...]:
    return (*v.train_files, v.test_file, v.meta_file)


def _find_python_dir(base: Path, v: CifarVariant) -> Path | None:
    """The folder holding the batch files: `base` itself, or `<folder>` up to two levels below."""
    if (base / v.test_file).is_file() and (base / v.meta_file).is_file():
        return base
    for pattern in (v.folder, f"*/{v.folder}", f"*/*/{v.folder}"):
        for d in sorted(base.glob(pattern)):
            if (d / v.test_file).is_file():
                return d
    return None


def _read_python_blobs(source: Path, v: CifarVariant) -> dict[str, bytes]:
    """File name -> bytes of the batch/meta files, from an extracted folder or the archive itself."""
    wanted = set(_python_members(v))
    if source.is_dir():
        d = _find_python_dir(source, v)
        if d is None:
            raise FileNotFoundError(f"{source}: no {v.folder}/{v.test_file}")
        missing = sorted(f for f in wanted if not (d / f).is_file())
        if missing:
            raise FileNotFoundError(f"{d}: missing {', '.join(missing)}")
        return {f: (d / f).read_bytes() for f in wanted}
    blobs: dict[str, bytes] = {}
    with tarfile.open(source, "r:*") as tf:  # sequential pass, members in any order
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) >= 2 and parts[-2] == v.folder and parts[-1] in wanted:
                blobs[parts[-1]] = tf.extractfile(m).read()
    missing = sorted(wanted - set(blobs))
    if missing:
        raise ValueError(f"{source}: not a complete {v.name} python archive (missing {v.folder}/"
                         f"{', '.join(missing)})")
    return blobs


def _batch(blob: bytes, what: str, v: CifarVariant) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(blob, what)
    if b"data" not in d or v.label_key not in d:
        raise ValueError(f"CIFAR pickle {what} lacks b'data' or {v.label_key!r}")
    x = np.asarray(d[b"data"])
    y = np.asarray(d[v.label_key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise ValueError(f"CIFAR pickle {what}: data {x.dtype} {x.shape} with {len(y)} labels; "
                         "expected uint8 N x 3072 and N labels")
    if len(y) and (y.min() < 0 or y.max() >= v.num_classes):
        raise ValueError(f"CIFAR pickle {what}: labels outside 0..{v.num_classes - 1}")
    return x.reshape(-1, 3, 32, 32), y


def read_python(source: str | Path, variant: str = "cifar10") -> FolderArrays:
    """Read the upstream python format (archive or extracted folder) into arrays."""
    v = VARIANTS[variant]
    source = Path(source)
    blobs = _read_python_blobs(source, v)
    train = [_batch(blobs[f], f, v) for f in v.train_files]
    test_x, test_y = _batch(blobs[v.test_file], v.test_file, v)
    meta = _unpickle(blobs[v.meta_file], v.meta_file)
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(v.names_key, ()))
    if len(names) != v.num_classes:
        raise ValueError(f"{source}: {v.meta_file} has {len(names)} class names, expected {v.num_classes}")
    return FolderArrays(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                        test_x, test_y, names)


# ----------------------------------------------------------------------------- locating


def _sniff(path: Path, v: CifarVariant) -> str | None:
    """'python', 'folder' or None for an archive, from its member names.

    Stops reading as soon as the answer is clear (a python batch file, or a
    train/ and a test/ image under one prefix), so a big tar is not listed whole.
    """
    splits: dict[tuple[str, ...], set[str]] = {}

    def verdict(name: str) -> str | None:
        parts = tuple(name.split("/"))
        if parts[-2:] == (v.folder, v.test_file):
            return "python"
        if len(parts) >= 3 and parts[-3] in ("train", "test", "val"):
            seen = splits.setdefault(parts[:-3], set())
            seen.add(parts[-3])
            if "train" in seen and len(seen) > 1:
                return "folder"
        return None

    try:
        if zipfile.is_zipfile(path) and not tarfile.is_tarfile(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        else:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    kind = verdict(m.name[2:] if m.name.startswith("./") else m.name)
                    if kind:
                        return kind
                return None
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError):
        return None
    for name in names:
        kind = verdict(name)
        if kind:
            return kind
    return None


def locate(root: Path, variant: str = "cifar10", path: str | Path | None = None, source: str = "auto",
           cached: Callable[[Path], bool] = lambda p: False) -> tuple[str, Path]:
    """(format, location) of the data to load; see the module docstring for the search order.

    cached(p) says an archive is already decoded in the cache (an image-folder
    source), which spares listing its members.
    """
    if source not in ("auto", "python", "folder"):
        raise ValueError(f"source must be 'auto', 'python' or 'folder', got {source!r}")
    v = VARIANTS[variant]
    kinds = ("python", "folder") if source == "auto" else (source,)
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{variant}: path {p} does not exist")
        if p.is_dir():
            if "python" in kinds and _find_python_dir(p, v) is not None:
                return "python", p
            if "folder" in kinds and find_folder_source(p) is not None:
                return "folder", find_folder_source(p)
        else:
            kind = "folder" if cached(p) else _sniff(p, v)
            if kind in kinds:
                return kind, p
        raise ValueError(f"{variant}: {p} holds no {' or '.join(kinds)}-format CIFAR data")
    base = Path(root) / variant
    if "python" in kinds:
        d = _find_python_dir(base, v) if base.is_dir() else None
        if d is not None:
            return "python", d
        for f in (base / "raw" / v.remote.filename, base / v.remote.filename):
            if f.is_file() and _sniff(f, v) == "python":
                return "python", f
    if "folder" in kinds:
        for d in [base, *(sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else [])]:
            if (d / "train").is_dir() and (d / "test").is_dir():
                return "folder", d
    archives = [p for d in (base / "raw", base) if d.is_dir() for p in sorted(d.iterdir())
                if is_archive(p) and not p.name.startswith(".")]
    for a in archives:
        kind = "folder" if cached(a) else _sniff(a, v)
        if kind in kinds:
            return kind, a
    raise FileNotFoundError(
        f"no {variant} data under {base}: download it (fedhpro.download.prepare, which puts "
        f"{v.remote.filename} into {base / 'raw'}) or give path= (the python archive, its extracted "
        f"{v.folder}/, or an image-folder tree/tar with train/<class>/* and test/<class>/*)")


# ----------------------------------------------------------------------------- loaders


def load_cifar(root: Path, variant: str = "cifar10", path: str | None = None, source: str = "auto",
               cache: bool = True) -> ArrayData:
    v = VARIANTS[variant]
    cache_dir = Path(root) / variant / "cache" if cache else None

    def cached(p: Path) -> bool:
        return cache_dir is not None and cache_path(cache_dir, p, image_size=32, channels=3).is_file()

    kind, where = locate(Path(root), variant, path, source, cached=cached)
    log.info("%s: reading %s format from %s", variant, kind, where)
    if kind == "python":
        arrays = read_python(where, variant)
    else:
        arrays = read_image_folder_cached(where, cache_dir, image_size=32, channels=3)
        if len(arrays.class_names) != v.num_classes:
            raise ValueError(f"{where}: {len(arrays.class_names)} class folders, {variant} has {v.num_classes}")
        if variant == "cifar10" and arrays.class_names != CIFAR10_CLASSES:
            log.warning("%s: class folders %s differ from the CIFAR-10 names; labels follow sorted folder "
                        "names", where, arrays.class_names)
    return ArrayData(train_x=torch.from_numpy(arrays.train_x), train_y=torch.from_numpy(arrays.train_y),
                     test_x=torch.from_numpy(arrays.test_x), test_y=torch.from_numpy(arrays.test_y),
                     num_classes=v.num_classes, mean=CIFAR_MEAN, std=CIFAR_STD, class_names=arrays.class_names)


def load_cifar10(root: Path, path: str | None = None, source: str = "auto", cache: bool = True, **_) -> ArrayData:
    """CIFAR-10 (see module docstring); path= an archive/tar/folder, else `<root>/cifar10/`."""
    return load_cifar(root, "cifar10", path=path, source=source, cache=cache)


def load_cifar100(root: Path, path: str | None = None, source: str = "auto", cache: bool = True,
                  **_) -> ArrayData:
    """CIFAR-100, fine labels (see module docstring); path= an archive/tar/folder, else `<root>/cifar100/`."""
    return load_cifar(root, "cifar100", path=path, source=source, cache=cache)


register(DatasetSpec(name="cifar10", num_classes=10, loader=load_cifar10, default_model="resnet10",
                     default_augment="crop_flip", train_size=50000, downloads=(CIFAR10_REMOTE,),
                     description="CIFAR-10, 32x32 RGB, 50000 train / 10000 test"))
register(DatasetSpec(name="cifar100", num_classes=100, loader=load_cifar100, default_model="resnet10",
                     default_augment="crop_flip", train_size=50000, downloads=(CIFAR100_REMOTE,),
                     description="CIFAR-100 (fine labels), 32x32 RGB, 50000 train / 10000 test; "
                                 "normalised with the CIFAR-10 statistics as in FedHPro's code"))
