"""Office-Caltech-10 (`office_caltech`): four domains of the ten classes shared by Office-31 and Caltech-256.

Source. There is no single official archive (Gong et al., CVPR 2012 took the 10 common classes
of Office-31 and Caltech-256). The registered download is FedBN's pre-processed
`office_caltech_10_dataset.zip` (Google Drive file id 1gxhV5xRXQgC9AL4XexduH7hdxDng7bJ3,
linked from https://github.com/med-air/FedBN), the copy FL papers use; it has no published
checksum and Google Drive cannot be fetched without a browser, so `prepare` refuses it unless a
mirror entry gives a local copy and that copy's checksum, e.g.

    prepare(DATASETS["office_caltech"].downloads, root, "office_caltech", mirror={
        "office_caltech_10_dataset.zip": {"url": "/data/office-caltech10-images.tar",
                                          "checksum": "md5:705926e90126d1d7414f52d53845864e",
                                          "filename": "office-caltech10-images.tar"}})

or put the folder / archive into `<root>/office_caltech/` (or give `path=`).

Layout. Any folder, tar (any compression) or zip whose image paths contain
`<domain>/.../<class>/<image>`: FedBN's `office_caltech_10/<domain>/<class>/*.jpg`, the
`images/<domain>/<class>/*.jpg` copy, FPL's `Office_Caltech_10/<domain>/<class>/*`, or Office-31's
`<domain>/images/<class>/*`. Names are matched case-insensitively ignoring `_`, `-`, spaces and a
Caltech-256 `NNN.` prefix; domain aliases: `caltech10`, `caltech256` -> caltech; class aliases:
`backpack` -> back_pack, `laptop` -> laptop_computer. Images of other classes are ignored (so an
Office-31 archive gives its Office-Caltech part). Expected totals: amazon 958, caltech 1123,
dslr 157, webcam 295 images.

Split. FPL's (RethinkFL `datasets/officecaltech.py`) fixed per-domain split: the domain's images
in ImageFolder order (classes in canonical order, which is the sorted folder order for every
naming variant above, then file paths sorted) and image i goes to train when i % 10 < 8, to test
otherwise (80/20, close to stratified; no random seed involved).

Images: decoded with PIL, RGB, resized (bilinear) to `image_size` x `image_size`, uint8
N x 3 x H x W. Default image_size=32 as in FPL (FedBN uses 256 with AlexNet: pass
image_size=256). Normalisation as FPL: ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224,
0.225); augmentation crop_flip (FPL's RandomCrop(32, padding=4) + RandomHorizontalFlip); default
model resnet10. `train_domain` / `test_domain` hold domain ids (runs report
`domain_acc_<domain>`).

Options: domains (subset and order; requested domains missing from the source are skipped with a
warning), image_size, train_per_domain / test_per_domain (None: all; else a fixed random subset,
`RandomState(subset_seed)`, kept in order; FPL gives each client 20% of its domain's training
images), path, cache (decoded domains cached as `<root>/office_caltech/cache/<key>.npz`).
"""

from __future__ import annotations

import logging
import re
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from fedhpro.data.registry import ArrayData, DatasetSpec, register
from fedhpro.data.digit_domains import IMAGENET_MEAN, IMAGENET_STD, subset
from fedhpro.data.imagefolder import (FolderArrays, collect_files, load_npz, save_npz, cache_path, decode_image,
                                      is_archive)
from fedhpro.download import ArchiveError, RemoteFile
from fedhpro.lazy import lazy_module

torch = lazy_module("torch")

log = logging.getLogger(__name__)

OFFICE_DOMAINS = ("amazon", "caltech", "dslr", "webcam")
OFFICE_CLASSES = ("back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor", "mouse",
                  "mug", "projector")
OFFICE_COUNTS = {"amazon": 958, "caltech": 1123, "dslr": 157, "webcam": 295}
OFFICE_REMOTE = RemoteFile("https://drive.google.com/uc?export=download&id=1gxhV5xRXQgC9AL4XexduH7hdxDng7bJ3",
                           "office_caltech_10_dataset.zip")  # no published checksum: needs a mirror checksum


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", re.sub(r"^\d+\.", "", name.strip().lower()))


DOMAIN_ALIASES = {**{d: d for d in OFFICE_DOMAINS}, "caltech10": "caltech", "caltech256": "caltech"}
CLASS_ALIASES = {**{_norm(c): c for c in OFFICE_CLASSES}, "laptop": "laptop_computer"}


def parse_member(rel: str) -> tuple[str, str] | None:
    """(domain, canonical class) of an image path, None if it is not an Office-Caltech-10 image."""
    parts = PurePosixPath(rel).parts
    if len(parts) < 3:
        return None
    for i in range(len(parts) - 3, -1, -1):  # the last domain-named folder with a class folder below it
        domain = DOMAIN_ALIASES.get(_norm(parts[i]))
        if domain is not None:
            cls = CLASS_ALIASES.get(_norm(parts[-2]))
            return (domain, cls) if cls is not None else None
    return None


def fpl_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """FPL's split of a domain's n ordered images: i % 10 < 8 -> train, else test."""
    i = np.arange(n)
    return i[i % 10 < 8], i[i % 10 >= 8]


def _locate(root: Path, path: str | None) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"office_caltech: path {p} does not exist")
        return p
    base = Path(root) / "office_caltech"
    for d in (base / "raw", base):
        if d.is_dir():
            archives = sorted(p for p in d.iterdir() if is_archive(p) and not p.name.startswith("."))
            if archives:
                return archives[0]
    if base.is_dir() and any(p.is_dir() and p.name not in ("raw", "cache") for p in base.iterdir()):
        return base
    raise FileNotFoundError(
        f"no Office-Caltech-10 data under {base}: there is no checksummed public download; put the images "
        f"(a folder, tar or zip with <domain>/<class>/*.jpg) into {base} or {base / 'raw'}, give path=, or run "
        "fedhpro.download.prepare with a mirror entry naming a local copy and its checksum (see "
        "fedhpro.data.office)")


def read_office(source: Path, domains: tuple[str, ...], image_size: int | None) -> dict[str, FolderArrays]:
    """Decode the requested domains of an Office-Caltech-10 source; FPL split per domain."""
    try:
        files = collect_files(source)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ArchiveError(f"cannot read {source} (corrupt or truncated): {exc}") from exc
    except OSError as exc:
        if exc.errno is None:  # gzip/bz2 stream errors
            raise ArchiveError(f"cannot read {source} (corrupt or truncated): {exc}") from exc
        raise
    per_domain: dict[str, list[tuple[int, str, str]]] = {d: [] for d in domains}
    ignored = 0
    for rel in files:
        hit = parse_member(rel)
        if hit is None:
            ignored += 1
            continue
        domain, cls = hit
        if domain in per_domain:
            per_domain[domain].append((OFFICE_CLASSES.index(cls), rel.rsplit("/", 1)[-1], rel))
    if ignored:
        log.info("%s: %d images outside the Office-Caltech-10 domains/classes ignored", source, ignored)
    out = {}
    for domain, items in per_domain.items():
        if not items:
            continue
        items.sort()
        x = None
        for i, (_, _, rel) in enumerate(items):
            img = decode_image(files[rel](), image_size, 3, f"{source}:{rel}")
            if x is None:
                x = np.empty((len(items), *img.shape), dtype=np.uint8)
            elif img.shape != x.shape[1:]:
                raise ValueError(f"{source}:{rel} has size {img.shape[1:]}, others {x.shape[2:]}; give image_size")
            x[i] = img
        y = np.array([c for c, _, _ in items], dtype=np.int64)
        tr, te = fpl_split(len(items))
        out[domain] = FolderArrays(x[tr], y[tr], x[te], y[te], OFFICE_CLASSES)
        log.info("office_caltech: %s: %d images (%d train / %d test)", domain, len(items), len(tr), len(te))
    return out


def load_office_caltech(root: Path, domains=OFFICE_DOMAINS, image_size: int | None = 32,
                        train_per_domain: int | None = None, test_per_domain: int | None = None,
                        subset_seed: int = 0, path: str | None = None, cache: bool = True) -> ArrayData:
    """Office-Caltech-10 with per-domain ids (see the module docstring)."""
    root = Path(root)
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    if not domains or len(set(domains)) != len(domains) or set(domains) - set(OFFICE_DOMAINS):
        raise ValueError(f"domains must be distinct names out of {', '.join(OFFICE_DOMAINS)}; got {list(domains)}")
    for name, v in (("train_per_domain", train_per_domain), ("test_per_domain", test_per_domain),
                    ("image_size", image_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
    source = _locate(root, path)
    cache_dir = root / "office_caltech" / "cache"
    cfiles = {d: cache_path(cache_dir, source, layout="office_caltech", domain=d, image_size=image_size)
              for d in domains} if cache else {}
    arrays: dict[str, FolderArrays] = {}
    for d, cfile in cfiles.items():
        if cfile.is_file():
            try:
                arrays[d] = load_npz(cfile)
            except Exception as exc:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring unreadable cache %s: %s", cfile, exc)
    todo = tuple(d for d in domains if d not in arrays)
    if todo:
        decoded = read_office(source, todo, image_size)
        for d, a in decoded.items():
            arrays[d] = a
            if cache:
                try:
                    save_npz(cfiles[d], a)
                except OSError as exc:
                    log.warning("cannot write cache %s: %s", cfiles[d], exc)
    found = [d for d in domains if d in arrays]
    missing = [d for d in domains if d not in arrays]
    if not found:
        raise FileNotFoundError(f"{source}: no images of the Office-Caltech-10 domains {', '.join(domains)} "
                                "(expected <domain>/<class>/<image> paths)")
    if missing:
        msg = f"office_caltech: {source} has no images of the domains {', '.join(missing)}; skipping them"
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
    xs, ys, ds, txs, tys, tds = [], [], [], [], [], []
    for did, d in enumerate(found):
        a = arrays[d]
        keep, tkeep = subset(len(a.train_y), train_per_domain, subset_seed), subset(len(a.test_y), test_per_domain,
                                                                                      subset_seed)
        xs.append(a.train_x[keep])
        ys.append(a.train_y[keep])
        ds.append(np.full(len(keep), did, dtype=np.int64))
        txs.append(a.test_x[tkeep])
        tys.append(a.test_y[tkeep])
        tds.append(np.full(len(tkeep), did, dtype=np.int64))

    def cat(parts):
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))

    return ArrayData(train_x=cat(xs), train_y=cat(ys), test_x=cat(txs), test_y=cat(tys), num_classes=10,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=OFFICE_CLASSES, train_domain=cat(ds),
                     test_domain=cat(tds), domain_names=tuple(found))


register(DatasetSpec(name="office_caltech", num_classes=10, loader=load_office_caltech, default_model="resnet10",
                     default_augment="crop_flip", domains=OFFICE_DOMAINS, downloads=(OFFICE_REMOTE,),
                     description="Office-Caltech-10 feature shift: amazon, caltech, dslr, webcam; 32x32 RGB (FPL), "
                                 "FPL's 80/20 split per domain; no published checksum: give a mirror or path="))
