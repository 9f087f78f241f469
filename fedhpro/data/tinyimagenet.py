"""Tiny-ImageNet-200 (200 classes, 64x64 RGB): the cs231n archive, read without extraction.

Upstream: http://cs231n.stanford.edu/tiny-imagenet-200.zip (248,100,043 bytes, md5
90528d7ca1a48142e341f4ef8d21d0de, the checksum torchvision-style loaders and Avalanche use).
Layout inside (under `tiny-imagenet-200/`):

    wnids.txt                                   the 200 WordNet ids, one a line (not sorted)
    words.txt                                   wnid -> names (not needed)
    train/<wnid>/images/<wnid>_<i>.JPEG         500 per class, 100,000 in all
    train/<wnid>/<wnid>_boxes.txt               bounding boxes (not needed)
    val/images/val_<i>.JPEG                     10,000 images, 50 per class, in ONE folder
    val/val_annotations.txt                     `val_<i>.JPEG<TAB><wnid><TAB>x0<TAB>y0<TAB>x1<TAB>y1`
    test/images/test_<i>.JPEG                   unlabelled: not used

* class index = position of the wnid in the SORTED wnids.txt (as torchvision's ImageFolder
  on train/ orders them); class_names are the wnids;
* the labelled val split is the test split; each val image's label comes from
  val/val_annotations.txt (a known bug elsewhere gives every val image class 0 by reading
  val/images/ as one class folder); a val image without an annotation, an annotation
  without an image, or an unknown wnid is an error;
* train samples are ordered by class, then file name; val samples in annotation-file order;
* images are decoded with PIL to RGB (a few are greyscale JPEGs), uint8 3 x 64 x 64;
  `image_size` other than 64 resizes (bilinear);
* normalisation: the usual Tiny-ImageNet training-set statistics, mean (0.4802, 0.4481,
  0.3975), std (0.2302, 0.2265, 0.2262); default model resnet10 (global average pooling,
  so 64x64 inputs work unchanged); augmentation crop_flip (random crop with padding 8 =
  size/8, and horizontal flip), as for CIFAR.

Where the data is looked for: `path=` (the zip, a tar of the same tree, or the extracted
folder), else under `<root>/tinyimagenet/`: an extracted folder holding wnids.txt (at most
two levels down), the downloaded zip in `raw/`, or any other archive there. The decoded
arrays are cached as `<root>/tinyimagenet/cache/<key>.npz` (see `fedhpro.data.imagefolder`).

This module also holds the small archive-member reader (`MemberSource`) and the square
resize (`decode_square`) that the HAM10000 and SUN397 loaders share.
"""

from __future__ import annotations

import io
import logging
import lzma
import os
import re
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np

from fedhpro.data.registry import ArrayData, DatasetSpec, register
from fedhpro.data.imagefolder import (IMAGE_EXTENSIONS, FolderArrays, load_npz, save_npz, cache_path,
                                      is_archive)
from fedhpro.download import ArchiveError, RemoteFile
from fedhpro.lazy import lazy_module

torch = lazy_module("torch")

log = logging.getLogger(__name__)

TINY_REMOTE = RemoteFile("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "tiny-imagenet-200.zip",
                         md5="90528d7ca1a48142e341f4ef8d21d0de")
TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2302, 0.2265, 0.2262)


# ----------------------------------------------------------------------------- shared helpers


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


class MemberSource:
    """The files of a directory, zip or tar (any compression), by relative POSIX name.

    `stream(want)` yields (name, bytes) for every regular file whose name `want`
    accepts, in one sequential pass (cheap for a compressed tar too). An unreadable,
    corrupt or truncated archive raises `fedhpro.download.ArchiveError` (zip: per-member
    CRC; compressed tar: the stream's CRC, checked when the pass reaches its end).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.kind = "dir"
        elif not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file or directory")
        elif zipfile.is_zipfile(self.path) and not _is_tar(self.path):
            self.kind = "zip"
        elif _is_tar(self.path):
            self.kind = "tar"
        else:
            raise ArchiveError(f"{self.path} is not a readable tar or zip archive (corrupt or truncated?)")

    def stream(self, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        if self.kind == "dir":
            for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    full = Path(dirpath) / fn
                    rel = full.relative_to(self.path).as_posix()
                    if want(rel):
                        yield rel, full.read_bytes()
            return
        try:
            if self.kind == "zip":
                with zipfile.ZipFile(self.path) as zf:
                    for info in zf.infolist():
                        name = _norm(info.filename)
                        if not info.is_dir() and want(name):
                            yield name, zf.read(info)
            else:
                with tarfile.open(self.path, "r:*") as tf:
                    for m in tf:
                        name = _norm(m.name)
                        if m.isfile() and want(name):
                            yield name, tf.extractfile(m).read()
                    # tarfile stops at the end-of-archive blocks; reading the compressed stream to its
                    # end makes gzip/bz2/xz check their CRC, so corrupted member data is not accepted
                    while tf.fileobj.read(1 << 20):
                        pass
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            raise ArchiveError(f"cannot read {self.path} (corrupt or truncated?): {exc}") from exc


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, tarfile.TarError):
        return False


def is_image_name(name: str) -> bool:
    parts = PurePosixPath(name).parts
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def decode_square(data: bytes, size: int | None, *, crop: bool = False, name: str = "") -> np.ndarray:
    """PIL-decode to uint8 3 x size x size RGB.

    crop=False resizes the whole image to size x size (aspect ratio not kept);
    crop=True takes the central square (side = the shorter side) first, i.e. a
    shorter-side resize followed by a center crop. Resampling is bilinear (PIL
    antialiases when shrinking); large JPEGs are decoded at a reduced DCT scale that
    is still at least `size` on the shorter side (PIL's `draft`), which makes big
    photos fast to load. size=None keeps the original size (no crop).
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if size and im.format == "JPEG":
                w, h = im.size
                if crop:
                    im.draft("RGB", (max(1, size * w // min(w, h)), max(1, size * h // min(w, h))))
                else:
                    im.draft("RGB", (size, size))
            im = im.convert("RGB")
            if size:
                if crop:
                    w, h = im.size
                    s = min(w, h)
                    left, top = (w - s) // 2, (h - s) // 2
                    im = im.crop((left, top, left + s, top + s))
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # PIL raises several kinds for undecodable data
        raise ValueError(f"cannot decode image {name or '<bytes>'}: {exc}") from exc
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def stack(images: list[np.ndarray], size: int | None, what: str) -> np.ndarray:
    """uint8 N x 3 x H x W from per-image arrays (same size required)."""
    if not images:
        return np.empty((0, 3, size or 0, size or 0), dtype=np.uint8)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{what}: images of different sizes {sorted(shapes)}; give image_size to resize")
    out = np.empty((len(images), *images[0].shape), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = im
    return out


def cached_arrays(cache_dir: Path | None, key_source: Path, build: Callable[[], FolderArrays],
                  **key_options) -> FolderArrays:
    """`build()`, reusing/writing `cache_dir/<key>.npz` (the imagefolder cache helpers)."""
    if cache_dir is None:
        return build()
    path = cache_path(cache_dir, key_source, **key_options)
    if path.is_file():
        try:
            return load_npz(path)
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s: %s", path, exc)
    arrays = build()
    try:
        save_npz(path, arrays)
    except OSError as exc:
        log.warning("cannot write cache %s: %s", path, exc)
    return arrays


def to_array_data(arrays: FolderArrays, num_classes: int, mean, std) -> ArrayData:
    return ArrayData(train_x=torch.from_numpy(arrays.train_x), train_y=torch.from_numpy(arrays.train_y),
                     test_x=torch.from_numpy(arrays.test_x), test_y=torch.from_numpy(arrays.test_y),
                     num_classes=num_classes, mean=tuple(mean), std=tuple(std), class_names=arrays.class_names)


# ----------------------------------------------------------------------------- Tiny-ImageNet

_TRAIN = re.compile(r"^(?P<p>(?:.*/)?)train/(?P<wnid>[^/]+)/images/(?P<f>[^/]+)$")
_VAL = re.compile(r"^(?P<p>(?:.*/)?)val/images/(?P<f>[^/]+)$")
_WNIDS = re.compile(r"^(?P<p>(?:.*/)?)wnids\.txt$")
_ANNOT = re.compile(r"^(?P<p>(?:.*/)?)val/val_annotations\.txt$")


def read_tinyimagenet(source: str | Path, image_size: int | None = 64) -> FolderArrays:
    """Decode the train and (labelled) val splits of a Tiny-ImageNet zip/tar/folder (module docstring)."""
    src = MemberSource(source)
    texts: dict[tuple[str, str], bytes] = {}
    train: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    val: dict[str, dict[str, np.ndarray]] = {}

    def want(name: str) -> bool:
        return bool(_WNIDS.match(name) or _ANNOT.match(name)
                    or (is_image_name(name) and (_TRAIN.match(name) or _VAL.match(name))))

    for name, data in src.stream(want):
        if m := _WNIDS.match(name):
            texts[(m["p"], "wnids")] = data
        elif m := _ANNOT.match(name):
            texts[(m["p"], "annotations")] = data
        elif m := _TRAIN.match(name):
            train.setdefault(m["p"], {})[(m["wnid"], m["f"])] = decode_square(data, image_size,
                                                                            name=f"{source}:{name}")
        elif m := _VAL.match(name):
            val.setdefault(m["p"], {})[m["f"]] = decode_square(data, image_size, name=f"{source}:{name}")
    prefixes = sorted({p for p, kind in texts if kind == "wnids"}, key=lambda p: (len(p), p))
    if not prefixes:
        raise ValueError(f"{source}: no wnids.txt; not a Tiny-ImageNet-200 archive or folder")
    if len(prefixes) > 1 and len(prefixes[0]) == len(prefixes[1]):
        raise ValueError(f"{source}: several Tiny-ImageNet trees ({', '.join(p or '.' for p in prefixes)}); "
                         "point path= at one of them")
    prefix = prefixes[0]
    wnids = [w.strip() for w in texts[(prefix, "wnids")].decode("utf-8").splitlines() if w.strip()]
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{source}: {prefix}wnids.txt lists a wnid twice")
    class_names = tuple(sorted(wnids))
    index = {w: i for i, w in enumerate(class_names)}

    train_images = train.get(prefix, {})
    unknown = sorted({w for w, _ in train_images} - set(index))
    if unknown:
        raise ValueError(f"{source}: train folders {unknown[:5]} are not in wnids.txt")
    if not train_images:
        raise ValueError(f"{source}: no images under {prefix}train/<wnid>/images/")
    keys = sorted(train_images, key=lambda k: (index[k[0]], k[1]))
    train_x = stack([train_images.pop(k) for k in keys], image_size, f"{source}:train")
    train_y = np.array([index[w] for w, _ in keys], dtype=np.int64)

    if (prefix, "annotations") not in texts:
        raise ValueError(f"{source}: no {prefix}val/val_annotations.txt (the val labels)")
    val_images = val.get(prefix, {})
    order: list[tuple[str, int]] = []
    seen: set[str] = set()
    for n, line in enumerate(texts[(prefix, "annotations")].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{source}: val_annotations.txt line {n}: expected '<file>\\t<wnid>\\t...'")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise ValueError(f"{source}: val_annotations.txt line {n}: wnid {wnid!r} is not in wnids.txt")
        if fname in seen:
            raise ValueError(f"{source}: val_annotations.txt line {n}: {fname} annotated twice")
        seen.add(fname)
        order.append((fname, index[wnid]))
    missing = [f for f, _ in order if f not in val_images]
    if missing:
        raise ValueError(f"{source}: {len(missing)} annotated val images are missing (e.g. {missing[0]}); "
                         "incomplete archive?")
    unlabelled = sorted(set(val_images) - seen)
    if unlabelled:
        raise ValueError(f"{source}: {len(unlabelled)} val images have no annotation (e.g. {unlabelled[0]})")
    test_x = stack([val_images.pop(f) for f, _ in order], image_size, f"{source}:val")
    test_y = np.array([c for _, c in order], dtype=np.int64)
    log.info("%s: %d train / %d val images, %d classes", source, len(train_x), len(test_x), len(class_names))
    return FolderArrays(train_x, train_y, test_x, test_y, class_names)


def _tree_dir(base: Path) -> Path | None:
    """A folder holding wnids.txt: base, or at most two levels below (cache/ skipped)."""
    if not base.is_dir():
        return None
    if (base / "wnids.txt").is_file():
        return base
    for pattern in ("*/wnids.txt", "*/*/wnids.txt"):
        for f in sorted(base.glob(pattern)):
            if "cache" not in f.relative_to(base).parts[:-1]:
                return f.parent
    return None


def locate_tinyimagenet(root: Path, path: str | Path | None = None) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"tinyimagenet: path {p} does not exist")
        return (_tree_dir(p) or p) if p.is_dir() else p
    base = Path(root) / "tinyimagenet"
    d = _tree_dir(base)
    if d is not None:
        return d
    for f in (base / "raw" / TINY_REMOTE.filename, base / TINY_REMOTE.filename):
        if f.is_file():
            return f
    for d in (base / "raw", base):
        if d.is_dir():
            archives = sorted(p for p in d.iterdir() if is_archive(p) and not p.name.startswith("."))
            if archives:
                return archives[0]
    raise FileNotFoundError(f"no tinyimagenet data under {base}: download it (fedhpro.download.prepare, which puts "
                            f"{TINY_REMOTE.filename} into {base / 'raw'}) or give path= (the zip or its extracted "
                            "tiny-imagenet-200/ folder)")


def load_tinyimagenet(root: Path, path: str | None = None, image_size: int = 64, cache: bool = True,
                      **_) -> ArrayData:
    """Tiny-ImageNet-200: train 100,000 / test (= labelled val) 10,000, uint8 3 x 64 x 64 (module docstring)."""
    source = locate_tinyimagenet(Path(root), path)
    cache_dir = Path(root) / "tinyimagenet" / "cache" if cache else None
    arrays = cached_arrays(cache_dir, source, lambda: read_tinyimagenet(source, image_size),
                           kind="tinyimagenet", image_size=image_size)
    if len(arrays.class_names) != 200:
        log.warning("%s: %d classes, Tiny-ImageNet-200 has 200", source, len(arrays.class_names))
    return to_array_data(arrays, len(arrays.class_names), TINY_MEAN, TINY_STD)


register(DatasetSpec(name="tinyimagenet", num_classes=200, loader=load_tinyimagenet, default_model="resnet10",
                     default_augment="crop_flip", train_size=100000, downloads=(TINY_REMOTE,),
                     description="Tiny-ImageNet-200, 64x64 RGB, 100000 train / 10000 test (the labelled val "
                                 "split, labels from val_annotations.txt)"))
