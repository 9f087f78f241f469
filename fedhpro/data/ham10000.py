"""HAM10000 (7 classes of pigmented skin lesions), with a fixed train/test split grouped by lesion.

Upstream: Harvard Dataverse, doi:10.7910/DVN/DBW86T (Tschandl et al. 2018, CC BY-NC 4.0):

    HAM10000_images_part_1.zip   https://dataverse.harvard.edu/api/access/datafile/3172585  (5,000 JPEGs)
    HAM10000_images_part_2.zip   https://dataverse.harvard.edu/api/access/datafile/3172584  (5,015 JPEGs)
    HAM10000_metadata.tab        https://dataverse.harvard.edu/api/access/datafile/3172582  (10,015 rows)

The images are 600x450 `ISIC_<7 digits>.jpg`, matched to the metadata by base name wherever
they sit in the zips or folders. Dataverse stores the metadata as an ingested table: the
plain access URL serves it tab-separated (`.tab`, quoted strings); `?format=original` or
the Kaggle copy give the comma-separated `HAM10000_metadata.csv`. Both are read (the
delimiter is detected); the columns used are lesion_id, image_id and dx.

CHECKSUMS: Dataverse lists an MD5 per file on the dataset page, but we could not confirm
them here, so the `RemoteFile`s carry none and the download step refuses to fetch them
until one is configured for each file, e.g. in the pipeline's `mirrors`:
`ham10000: {HAM10000_images_part_1.zip: {checksum: "md5:<from the dataset page>"}, ...}`
(no `url` keeps the upstream URL). The datafile ids are those in wide use for the
current dataset version; a newer version may move them.

* classes: the 7 dx codes in sorted order: akiec, bcc, bkl, df, mel, nv, vasc
  (upstream counts 327, 514, 1099, 115, 1113, 6705, 142);
* split: fixed, grouped by lesion_id (several images show the same lesion; one lesion is
  never in both splits), stratified by dx at the lesion level: per dx, the sorted lesion
  ids are permuted with numpy's default_rng(`split_seed`=0) and the first
  round(`test_fraction`=0.2 x lesions) go to test; samples ordered by image_id per split;
* images: decoded to RGB and resized to `image_size` x `image_size` (default 64; the 4:3
  image is squeezed to a square as torchvision's Resize((64, 64)) would; `crop=True`
  takes the central 450x450 square first), uint8 3 x 64 x 64;
* normalisation: per-channel mean/std of the training split (computed at load time,
  exact, from the fixed split); default model resnet10; augmentation crop_flip (random
  crop with padding size/8, horizontal flip), as for the CIFAR runs;
* an image listed in the metadata but absent from the sources is an error unless
  `allow_missing=True` (then the row is dropped with a warning).

Where the files are looked for: `path=` (a folder holding the metadata and the zips or
extracted image folders, or an archive holding everything, e.g. Kaggle's), else
`<root>/ham10000/raw/` (where `fedhpro.download.prepare` puts them) and `<root>/ham10000/`.
Images are read from the archives in those folders and from their sub-folders (any depth,
e.g. `HAM10000_images_part_1/` or a `safe_extract` target), not from loose files.
The decoded arrays are cached as `<root>/ham10000/cache/<key>.npz`.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path, PurePosixPath

import numpy as np

from fedhpro.data.registry import ArrayData, DatasetSpec, register
from fedhpro.data.imagefolder import FolderArrays, channel_stats, is_archive, source_key
from fedhpro.data.tinyimagenet import MemberSource, cached_arrays, decode_square, is_image_name, stack, to_array_data
from fedhpro.download import RemoteFile

log = logging.getLogger(__name__)

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
_DV = "https://dataverse.harvard.edu/api/access/datafile/"
# No checksums: not confirmed (see the module docstring); the download step asks for configured ones.
HAM_REMOTES = (RemoteFile(_DV + "3172585", "HAM10000_images_part_1.zip"),
               RemoteFile(_DV + "3172584", "HAM10000_images_part_2.zip"),
               RemoteFile(_DV + "3172582", "HAM10000_metadata.tab"))
METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata")


# ----------------------------------------------------------------------------- metadata


def parse_metadata(data: bytes, what: str) -> list[dict[str, str]]:
    """Rows (lesion_id, image_id, dx) of HAM10000_metadata (.csv or Dataverse's tab-separated .tab)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: not UTF-8 text ({exc})") from exc
    first = text.split("\n", 1)[0]
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if "\t" in first else ",")
    missing = {"lesion_id", "image_id", "dx"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{what}: no column(s) {sorted(missing)}; header is {reader.fieldnames}")
    rows, seen = [], set()
    for row in reader:
        r = {k: (row[k] or "").strip() for k in ("lesion_id", "image_id", "dx")}
        if not r["image_id"]:
            continue
        if r["dx"] not in HAM_CLASSES:
            raise ValueError(f"{what}: line {reader.line_num}: dx {r['dx']!r} is not one of {', '.join(HAM_CLASSES)}")
        if not r["lesion_id"]:
            raise ValueError(f"{what}: line {reader.line_num}: empty lesion_id")
        if r["image_id"] in seen:
            raise ValueError(f"{what}: line {reader.line_num}: image {r['image_id']} listed twice")
        seen.add(r["image_id"])
        rows.append(r)
    if not rows:
        raise ValueError(f"{what}: no rows")
    return rows


def lesion_split(rows: list[dict[str, str]], test_fraction: float = 0.2,
                 seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, test rows), grouped by lesion_id, stratified by dx per lesion; each sorted by image_id."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    lesion_dx: dict[str, str] = {}
    for r in rows:
        lesion_dx.setdefault(r["lesion_id"], r["dx"])  # a lesion's class: its first row's dx
    rng = np.random.default_rng(seed)
    test_lesions: set[str] = set()
    for dx in HAM_CLASSES:
        lesions = sorted(lesion for lesion, d in lesion_dx.items() if d == dx)
        if not lesions:
            continue
        order = rng.permutation(len(lesions))
        n_test = int(round(test_fraction * len(lesions)))
        test_lesions.update(lesions[i] for i in order[:n_test])
    train = sorted((r for r in rows if r["lesion_id"] not in test_lesions), key=lambda r: r["image_id"])
    test = sorted((r for r in rows if r["lesion_id"] in test_lesions), key=lambda r: r["image_id"])
    return train, test


# ----------------------------------------------------------------------------- locating


def _find_metadata_file(d: Path) -> Path | None:
    for pattern in ("", "*/", "*/*/"):
        for name in METADATA_NAMES:
            hits = sorted(d.glob(pattern + name)) if pattern else ([d / name] if (d / name).is_file() else [])
            hits = [h for h in hits if h.is_file() and "cache" not in h.relative_to(d).parts]
            if hits:
                return hits[0]
    return None


def _is_metadata_member(name: str) -> bool:
    return PurePosixPath(name).name in METADATA_NAMES


def locate_ham10000(root: Path, path: str | Path | None = None) -> tuple[tuple[Path, str | None], list[Path]]:
    """((metadata file or archive holding it, member name or None), image sources: archives and folders)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"ham10000: path {p} does not exist")
        dirs = [p] if p.is_dir() else []
        archives = [] if p.is_dir() else [p]
    else:
        base = Path(root) / "ham10000"
        dirs = [d for d in (base / "raw", base) if d.is_dir()]
        archives = []
    for d in dirs:
        archives += sorted(a for a in d.iterdir() if is_archive(a) and not a.name.startswith("."))
    metadata: tuple[Path, str | None] | None = None
    for d in dirs:
        f = _find_metadata_file(d)
        if f is not None:
            metadata = (f, None)
            break
    if metadata is None:
        for a in archives:
            for name, _ in MemberSource(a).stream(_is_metadata_member):
                metadata = (a, name)
                break
            if metadata:
                break
    if metadata is None:
        where = ", ".join(str(x) for x in dirs + archives) or str(Path(root) / "ham10000")
        raise FileNotFoundError(f"no HAM10000 metadata ({' / '.join(METADATA_NAMES)}) in {where}: download the "
                                "dataset (fedhpro.download.prepare puts it into <root>/ham10000/raw; the files need "
                                "configured checksums) or give path=")
    # image folders: the sub-folders (walked to any depth) of the given/base folders, not cache/ or raw/
    folders = [f for d in dirs for f in sorted(d.iterdir())
               if f.is_dir() and f.name not in ("cache", "raw") and not f.name.startswith(".")]
    return metadata, archives + folders


# ----------------------------------------------------------------------------- loading


def read_ham10000(metadata: tuple[Path, str | None], sources: list[Path], *, image_size: int | None = 64,
                  crop: bool = False, test_fraction: float = 0.2, split_seed: int = 0,
                  allow_missing: bool = False) -> FolderArrays:
    meta_path, member = metadata
    if member is None:
        blob = meta_path.read_bytes()
    else:
        blob = next(data for _, data in MemberSource(meta_path).stream(lambda n: n == member))
    rows = parse_metadata(blob, f"{meta_path}{':' + member if member else ''}")
    wanted = {r["image_id"] for r in rows}
    images: dict[str, np.ndarray] = {}

    def want(name: str) -> bool:
        parts = PurePosixPath(name).parts
        if "cache" in parts[:-1] or not is_image_name(name):
            return False
        stem = PurePosixPath(name).stem
        return stem in wanted and stem not in images

    for src in sources:
        if len(images) == len(wanted):
            break
        for name, data in MemberSource(src).stream(want):
            stem = PurePosixPath(name).stem
            if stem not in images:
                images[stem] = decode_square(data, image_size, crop=crop, name=f"{src}:{name}")
    missing = sorted(wanted - set(images))
    if missing:
        msg = (f"HAM10000: {len(missing)} of {len(wanted)} images listed in the metadata were not found in "
               f"{', '.join(map(str, sources))} (e.g. {', '.join(missing[:3])})")
        if not allow_missing:
            raise ValueError(msg + "; incomplete download? (allow_missing=True drops them)")
        log.warning("%s; dropping them", msg)
        rows = [r for r in rows if r["image_id"] in images]
    train, test = lesion_split(rows, test_fraction, split_seed)
    index = {c: i for i, c in enumerate(HAM_CLASSES)}
    out = []
    for split, part in (("train", train), ("test", test)):
        out.append(stack([images.pop(r["image_id"]) for r in part], image_size, f"HAM10000 {split}"))
        out.append(np.array([index[r["dx"]] for r in part], dtype=np.int64))
    log.info("HAM10000: %d train / %d test images (%d lesions)", len(out[0]), len(out[2]),
             len({r["lesion_id"] for r in rows}))
    return FolderArrays(*out, class_names=HAM_CLASSES)


def load_ham10000(root: Path, path: str | None = None, image_size: int = 64, crop: bool = False,
                  test_fraction: float = 0.2, split_seed: int = 0, allow_missing: bool = False, cache: bool = True,
                  **_) -> ArrayData:
    """HAM10000, 7 classes, lesion-grouped fixed split, uint8 3 x 64 x 64 (see the module docstring)."""
    metadata, sources = locate_ham10000(Path(root), path)
    cache_dir = Path(root) / "ham10000" / "cache" if cache else None
    arrays = cached_arrays(
        cache_dir, metadata[0],
        lambda: read_ham10000(metadata, sources, image_size=image_size, crop=crop, test_fraction=test_fraction,
                              split_seed=split_seed, allow_missing=allow_missing),
        kind="ham10000", member=metadata[1], images=[source_key(s) for s in sources], image_size=image_size,
        crop=crop, test_fraction=test_fraction, split_seed=split_seed, allow_missing=allow_missing)
    if len(arrays.train_x) == 0:
        raise ValueError("HAM10000: no training images")
    mean, std = channel_stats(arrays.train_x)
    return to_array_data(arrays, len(HAM_CLASSES), mean, tuple(s if s > 0 else 1.0 for s in std))


register(DatasetSpec(name="ham10000", num_classes=7, loader=load_ham10000, default_model="resnet10",
                     default_augment="crop_flip", downloads=HAM_REMOTES,
                     description="HAM10000 dermatoscopic images, 7 classes, resized to 64x64 RGB; fixed 80/20 "
                                 "split grouped by lesion_id (stratified by dx); checksums must be configured"))
