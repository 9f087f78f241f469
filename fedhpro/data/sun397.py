"""SUN397 (397 scene classes) with the official train/test partition 01, resized to 64x64.

Upstream (Xiao et al. 2010, https://vision.princeton.edu/projects/2010/SUN/):

    SUN397.tar.gz   http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz   (about 37 GB,
                    108,754 JPEGs; md5 8ca2778205c41d23104230ba66911c7a as torchvision's SUN397,
                    sha256 f404130965a7ad77bed5ececc71e720ab50f3cc1e1bb257257610d38f3b928ec as
                    torchvision's prototype datasets; the sha256 is the one verified)
    Partitions.zip  https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip
                    (sha256 e3311ea5f812d4cc6faef194688343d1111f6cd6f70f2c62f393c2b8d6ba1ec9, from
                    torchvision's prototype datasets): ClassName.txt and the ten official splits
                    Training_01..10.txt / Testing_01..10.txt

Layout: `SUN397/<letter>/<class path>/sun_<16 letters>.jpg`, class paths possibly nested
(`/b/bakery/shop`); `ClassName.txt` lists the 397 classes as `/a/abbey`, one a line, in
alphabetical order; the partition files list images as `/a/abbey/sun_....jpg`, 50 per class
in each split (19,850 train / 19,850 test for every partition).

* split: the official partition `partition` (default 1, i.e. Training_01.txt /
  Testing_01.txt); the other 69,054 images are not used; samples are in partition-file
  order;
* class index = line of the class in ClassName.txt (from Partitions.zip); class_names as
  torchvision's SUN397: the line without its `/<letter>/` prefix (`abbey`, `bakery/shop`);
* images: decoded to RGB, shorter side resized to `image_size` (default 64) and center
  cropped to a square (`crop=True`, default; `crop=False` squeezes the whole image),
  bilinear, uint8 3 x 64 x 64; large JPEGs are decoded at a reduced DCT scale first;
* normalisation: per-channel mean/std of the training split, computed at load time;
  default model resnet10; augmentation crop_flip (random crop with padding size/8,
  horizontal flip), as for CIFAR.

Where the data is looked for: `path=` (the image tar, or the extracted SUN397/ folder)
and `partitions=` (Partitions.zip or its extracted folder), else under `<root>/sun397/`:
an extracted SUN397 folder (ClassName.txt next to one-letter folders, at most two levels
down) or `raw/SUN397.tar.gz`, and `raw/Partitions.zip` or an extracted folder holding
Training_01.txt. The tar is read in one sequential pass without extraction (decoding
only the partition's images); the arrays are cached as `<root>/sun397/cache/<key>.npz`.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path, PurePosixPath

import numpy as np

from fedhpro.data.registry import ArrayData, DatasetSpec, register
from fedhpro.data.imagefolder import FolderArrays, channel_stats, source_key
from fedhpro.data.tinyimagenet import MemberSource, cached_arrays, decode_square, is_image_name, to_array_data
from fedhpro.download import RemoteFile

log = logging.getLogger(__name__)

SUN_REMOTE = RemoteFile("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", "SUN397.tar.gz",
                        md5="8ca2778205c41d23104230ba66911c7a",
                        sha256="f404130965a7ad77bed5ececc71e720ab50f3cc1e1bb257257610d38f3b928ec")
PARTITIONS_REMOTE = RemoteFile("https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip",
                               "Partitions.zip",
                               sha256="e3311ea5f812d4cc6faef194688343d1111f6cd6f70f2c62f393c2b8d6ba1ec9")
NUM_CLASSES = 397


# ----------------------------------------------------------------------------- partitions


def read_partitions(source: str | Path, partition: int = 1) -> tuple[list[str], list[str], list[str]]:
    """(class keys '/a/abbey' in ClassName.txt order, train image keys, test image keys) of one partition."""
    if not 1 <= int(partition) <= 10:
        raise ValueError(f"partition must be 1..10 (the official SUN397 splits), got {partition!r}")
    names = {"ClassName.txt": "classes", f"Training_{int(partition):02d}.txt": "train",
             f"Testing_{int(partition):02d}.txt": "test"}
    found: dict[str, tuple[int, bytes]] = {}
    for name, data in MemberSource(source).stream(lambda n: PurePosixPath(n).name in names
                                                  and "__MACOSX" not in n):
        kind, depth = names[PurePosixPath(name).name], len(PurePosixPath(name).parts)
        if kind not in found or depth < found[kind][0]:
            found[kind] = (depth, data)
    missing = [n for n, k in names.items() if k not in found]
    if missing:
        raise ValueError(f"{source}: no {', '.join(missing)} (expected the files of SUN397's Partitions.zip)")

    def lines(kind: str) -> list[str]:
        return [ln.strip() for ln in found[kind][1].decode("utf-8").splitlines() if ln.strip()]

    classes, train, test = lines("classes"), lines("train"), lines("test")
    if len(set(classes)) != len(classes):
        raise ValueError(f"{source}: ClassName.txt lists a class twice")
    known = set(classes)
    for kind, keys in (("Training", train), ("Testing", test)):
        bad = [k for k in keys if str(PurePosixPath(k).parent) not in known]
        if bad:
            raise ValueError(f"{source}: {kind}_{int(partition):02d}.txt: {bad[0]} is not in a ClassName.txt class")
        if len(set(keys)) != len(keys):
            raise ValueError(f"{source}: {kind}_{int(partition):02d}.txt lists an image twice")
    both = set(train) & set(test)
    if both:
        raise ValueError(f"{source}: partition {partition}: {sorted(both)[0]} is in both Training and Testing")
    return classes, train, test


def class_display_name(key: str) -> str:
    """'/a/abbey' -> 'abbey', '/b/bakery/shop' -> 'bakery/shop' (torchvision's SUN397 names)."""
    return key[3:] if len(key) > 3 and key[0] == "/" and key[2] == "/" else key.lstrip("/")


# ----------------------------------------------------------------------------- images


def read_sun397(images: str | Path, partitions: str | Path, *, partition: int = 1, image_size: int = 64,
                crop: bool = True) -> FolderArrays:
    classes, train_keys, test_keys = read_partitions(partitions, partition)
    index = {c: i for i, c in enumerate(classes)}
    slots: dict[str, tuple[int, int]] = {}
    for s, keys in enumerate((train_keys, test_keys)):
        for i, k in enumerate(keys):
            slots[k] = (s, i)
    xs = [np.empty((len(keys), 3, image_size, image_size), dtype=np.uint8) for keys in (train_keys, test_keys)]
    filled = [np.zeros(len(keys), dtype=bool) for keys in (train_keys, test_keys)]

    def key_of(name: str) -> str | None:
        """The partition key of an archive member: '/a/abbey/sun_x.jpg' at any prefix (e.g. 'SUN397/')."""
        parts = PurePosixPath(name).parts
        for i in range(len(parts) - 2):
            if len(parts[i]) == 1:
                key = "/" + "/".join(parts[i:])
                if key in slots:
                    return key
        return None

    def want(name: str) -> bool:
        if not is_image_name(name):
            return False
        key = key_of(name)
        return key is not None and not filled[slots[key][0]][slots[key][1]]

    for name, data in MemberSource(images).stream(want):
        s, i = slots[key_of(name)]
        xs[s][i] = decode_square(data, image_size, crop=crop, name=f"{images}:{name}")
        filled[s][i] = True
    for s, keys in enumerate((train_keys, test_keys)):
        missing = [keys[i] for i in np.flatnonzero(~filled[s])]
        if missing:
            raise ValueError(f"{images}: {len(missing)} images of partition {partition} are missing (e.g. "
                             f"{missing[0]}); incomplete archive or wrong folder?")
    ys = [np.array([index[str(PurePosixPath(k).parent)] for k in keys], dtype=np.int64)
          for keys in (train_keys, test_keys)]
    log.info("%s: partition %d, %d train / %d test images, %d classes", images, partition, len(train_keys),
             len(test_keys), len(classes))
    return FolderArrays(xs[0], ys[0], xs[1], ys[1], tuple(class_display_name(c) for c in classes))


# ----------------------------------------------------------------------------- locating


def _search(base: Path, test) -> Path | None:
    """base, or a folder at most two levels below it (not cache/), for which test(folder) holds."""
    if not base.is_dir():
        return None
    for d in [base, *sorted(base.glob("*")), *sorted(base.glob("*/*"))]:
        if d.is_dir() and "cache" not in d.relative_to(base).parts and test(d):
            return d
    return None


def _is_image_root(d: Path) -> bool:
    return (d / "ClassName.txt").is_file() and any((d / c).is_dir() for c in string.ascii_lowercase)


def _is_partitions_dir(d: Path) -> bool:
    return (d / "Training_01.txt").is_file() and (d / "ClassName.txt").is_file()


def locate_sun397(root: Path, path: str | Path | None = None,
                  partitions: str | Path | None = None) -> tuple[Path, Path]:
    """(image source: tar or SUN397 folder, partitions source: zip or folder)."""
    base = Path(root) / "sun397"
    if path is not None:
        images = Path(path).expanduser()
        if not images.exists():
            raise FileNotFoundError(f"sun397: path {images} does not exist")
        if images.is_dir():
            images = _search(images, _is_image_root) or images
    else:
        images = _search(base, _is_image_root)
        if images is None:
            images = next((f for f in (base / "raw" / SUN_REMOTE.filename, base / SUN_REMOTE.filename)
                           if f.is_file()), None)
    if partitions is not None:
        parts = Path(partitions).expanduser()
        if not parts.exists():
            raise FileNotFoundError(f"sun397: partitions {parts} does not exist")
        if parts.is_dir():
            parts = _search(parts, _is_partitions_dir) or parts
    else:
        parts = next((f for f in (base / "raw" / PARTITIONS_REMOTE.filename, base / PARTITIONS_REMOTE.filename)
                      if f.is_file()), None) or _search(base, _is_partitions_dir)
    if images is None or parts is None:
        what = " and ".join(n for n, v in ((SUN_REMOTE.filename, images), (PARTITIONS_REMOTE.filename, parts))
                            if v is None)
        raise FileNotFoundError(f"no SUN397 {what} under {base}: download them (fedhpro.download.prepare puts them "
                                f"into {base / 'raw'}) or give path= (images) and partitions=")
    return images, parts


def load_sun397(root: Path, path: str | None = None, partitions: str | None = None, partition: int = 1,
                image_size: int = 64, crop: bool = True, cache: bool = True, **_) -> ArrayData:
    """SUN397, official partition 01 (19,850 train / 19,850 test), uint8 3 x 64 x 64 (module docstring)."""
    images, parts = locate_sun397(Path(root), path, partitions)
    cache_dir = Path(root) / "sun397" / "cache" if cache else None
    arrays = cached_arrays(cache_dir, images,
                           lambda: read_sun397(images, parts, partition=partition, image_size=image_size, crop=crop),
                           kind="sun397", partitions=source_key(parts), partition=int(partition),
                           image_size=image_size, crop=crop)
    if len(arrays.class_names) != NUM_CLASSES:
        log.warning("SUN397: %d classes in ClassName.txt, expected %d", len(arrays.class_names), NUM_CLASSES)
    if len(arrays.train_x) == 0:
        raise ValueError("SUN397: no training images")
    mean, std = channel_stats(arrays.train_x)
    return to_array_data(arrays, len(arrays.class_names), mean, tuple(s if s > 0 else 1.0 for s in std))


register(DatasetSpec(name="sun397", num_classes=NUM_CLASSES, loader=load_sun397, default_model="resnet10",
                     default_augment="crop_flip", train_size=19850, downloads=(SUN_REMOTE, PARTITIONS_REMOTE),
                     description="SUN397 scenes, 397 classes, official partition 01 (19850 train / 19850 test), "
                                 "shorter side resized to 64 and center-cropped, RGB"))
