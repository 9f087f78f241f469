"""USPS, SVHN, SynDigits and the feature-shift dataset `digit_domains` (MNIST, USPS, SVHN, SynDigits).

Single datasets
---------------
* `usps`: the libsvm files `usps.bz2` (7,291 train) and `usps.t.bz2` (2,007 test) from
  https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/ (md5 as in torchvision).
  Lines are `label idx:value ...` with 256 values in [-1, 1] (a missing index is 0) and labels
  1..10, mapped to 0..9. Pixels are converted as torchvision's USPS does:
  uint8((value + 1) / 2 * 255) in float32 (truncation), after clipping to [-1, 1]. 16x16 grey.
* `svhn`: the cropped-digits files `train_32x32.mat` (73,257) and `test_32x32.mat` (26,032) from
  http://ufldl.stanford.edu/housenumbers/ (md5 as in torchvision), MATLAB v5 files read with
  `scipy.io.loadmat` (scipy comes with scikit-learn): X is 32 x 32 x 3 x N uint8, y is N x 1 with
  label 10 for the digit 0 (mapped to 0). 32x32 RGB.
* `syndigits`: SynDigits / SynNumbers (Ganin & Lempitsky, ICML 2015), the synthetic digits that
  FedBN and FPL use as their fourth digit domain. Source: the authors' `SynthDigits.zip`
  (Google Drive file id 0B9Z4d7lAwbnTSVR1dEFSRUFxOUU, linked from http://yaroslav.ganin.net/),
  which holds `synth_train_32x32.mat` and `synth_test_32x32.mat` in SVHN's .mat format (same X / y
  layout; a label 10, if present, is mapped to 0). There is no published checksum and Google Drive
  cannot be fetched without a browser, so its RemoteFile has no checksum: `prepare` refuses it
  unless a mirror entry gives the local copy and its checksum, e.g.
  `mirror={"SynthDigits.zip": {"url": "/path/to/SynthDigits.zip", "checksum": "md5:..."}}`; or
  copy the zip / the two .mat files into `<root>/syndigits/`. FPL's image-folder copy
  (`syn/train/<digit>/*`, `syn/val/<digit>/*`) works as well (`path=` or `<root>/syndigits/syn/`).
  32x32 RGB.

All single loaders look in `path=` (a folder) or `<root>/<name>/raw/` and `<root>/<name>/`.
Normalisation: USPS and SynDigits mean/std from their training images; SVHN the usual
(0.4377, 0.4438, 0.4728) / (0.1980, 0.2010, 0.1970). No augmentation; default model `cnn`.

digit_domains
-------------
The FPL (Huang et al., CVPR 2023, "Rethinking Federated Learning with Domain Shift: A Prototype
View") digits benchmark: domains mnist, usps, svhn, syn. Every domain is resized to 32 x 32
(PIL bilinear, as FPL's `transforms.Resize((32, 32))`), grey images repeated to 3 channels,
uint8 N x 3 x 32 x 32; `train_domain` / `test_domain` hold the domain id (position in
`domain_names`) of every sample, so runs report `domain_acc_<domain>` columns. Normalisation
as FPL: ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); augmentation as FPL:
RandomCrop(32, padding=4) + RandomHorizontalFlip (`crop_flip`); default model `resnet10` (FPL's).

Loader options (`load_dataset("digit_domains", root, **options)`):
  domains=("mnist", "usps", "svhn", "syn"): which domains, in this order (ids 0..k-1).
      A requested domain with no local data is refused: a one-line FileNotFoundError names the
      missing file(s) and where they were looked for (no domain is ever dropped silently: an
      experiment on fewer domains says so in its config, e.g. `domains: [mnist, usps, svhn]`, and
      its tables then have those domains' columns only).
  train_per_domain=743, test_per_domain=1860: samples kept per domain (None: all). The defaults
      are FedBN's digits setting (every domain truncated to 7,438 train / 1,860 test samples, and
      each client trains on 10% of its domain's training data = 743 samples); FPL instead gives each
      client 1% of its domain's training set. The subset is a fixed random draw without
      replacement (`RandomState(subset_seed).choice`, default seed 0, independent of the run seed)
      kept in the original order; with `partition: domains` the kept samples of a domain are then
      split over that domain's clients.
  paths={domain: folder}: where a domain's files are (overrides the search).
  cache=True: the processed per-domain arrays are cached in `<root>/digit_domains/cache/` (the
      key covers the source files' path/size/mtime and every option).
Each domain's files are looked for in `<root>/digit_domains/raw/`, `<root>/digit_domains/`, then
in the single dataset's folders (`<root>/<mnist|usps|svhn|syndigits>/raw/` and `.../`), so files
downloaded for `mnist` or `usps` serve `digit_domains` too.

Downloads: `downloads` lists every domain's upstream files (MNIST's 4 IDX files, USPS's 2 libsvm
files, SVHN's 2 .mat files, SynthDigits.zip); `downloads_for(domains)` those of some domains, and the
DatasetSpec hook `downloads_for(options)` those a run needs (its `domains`, less those given by
`paths=`), so the workflow's download step fetches only the requested domains' files (the union
over the sweep's runs) into `<root>/digit_domains/raw/`. A domain the loader already finds in
another of its folders (e.g. `<root>/mnist/raw/` from the `mnist` download) is not fetched again
if its files verify (upstream checksum, or the one a mirror entry gives; hook `local_copies`).
SynDigits has no checksummed upstream: the workflow refuses at load time to request it unless the
loader finds it locally or `mirrors: {digit_domains: {SynthDigits.zip: {url: ..., checksum: ...}}}`
gives a copy with its checksum.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedhpro.data.registry import ArrayData, DatasetSpec, register
from fedhpro.data.imagefolder import (FolderArrays, load_npz, save_npz, cache_path, channel_stats,
                                      read_image_folder, source_key)
from fedhpro.data.mnist_family import (IDX_FILES, MNIST_REMOTES, find_file, read_bytes, read_idx_dataset,
                                       search_dirs)
from fedhpro.download import ArchiveError, RemoteFile, mirror_checksum, verify
from fedhpro.lazy import lazy_module

torch = lazy_module("torch")

log = logging.getLogger(__name__)

USPS_BASE = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"
USPS_REMOTES = (RemoteFile(USPS_BASE + "usps.bz2", "usps.bz2", md5="ec16c51db3855ca6c91edd34d0e9b197"),
                RemoteFile(USPS_BASE + "usps.t.bz2", "usps.t.bz2", md5="8ea070ee2aca1ac39742fdd1ef5ed118"))
SVHN_BASE = "http://ufldl.stanford.edu/housenumbers/"
SVHN_REMOTES = (RemoteFile(SVHN_BASE + "train_32x32.mat", "train_32x32.mat", md5="e26dedcc434d2e4c54c9b2d4a06d8373"),
                RemoteFile(SVHN_BASE + "test_32x32.mat", "test_32x32.mat", md5="eb5a983be6a315427106f1b164d9cef3"))
# No published checksum exists for SynthDigits.zip (and Google Drive needs a browser): `prepare`
# refuses it without a mirror entry that names a local copy and its checksum.
SYN_REMOTE = RemoteFile("https://drive.google.com/uc?export=download&id=0B9Z4d7lAwbnTSVR1dEFSRUFxOUU",
                        "SynthDigits.zip")
SYN_FILES = ("synth_train_32x32.mat", "synth_test_32x32.mat")

SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
DIGIT_DOMAINS = ("mnist", "usps", "svhn", "syn")
DOMAIN_DATASET = {"mnist": "mnist", "usps": "usps", "svhn": "svhn", "syn": "syndigits"}
FEDBN_TRAIN, FEDBN_TEST = 743, 1860

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------- USPS (libsvm)


def parse_usps(data: bytes, what: str = "USPS", n_features: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """libsvm text -> (uint8 N x 1 x 16 x 16 as torchvision converts it, int64 labels 0..9)."""
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError as exc:
        raise ArchiveError(f"{what}: not a libsvm text file: {exc}") from exc
    lines = [ln.split(None, 1) for ln in lines if ln.strip()]
    try:
        labels = np.array([float(parts[0]) for parts in lines], dtype=np.float64)
    except ValueError as exc:
        raise ArchiveError(f"{what}: a line does not start with a numeric label (corrupt or truncated?)") from exc
    rests = [parts[1] if len(parts) > 1 else "" for parts in lines]
    counts = np.array([r.count(":") for r in rests], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy warns when it stops at a bad token
        try:
            flat = np.fromstring(" ".join(rests).replace(":", " "), dtype=np.float64, sep=" ")
        except (ValueError, DeprecationWarning) as exc:
            raise ArchiveError(f"{what}: not 'label idx:value ...' lines (corrupt or truncated?)") from exc
    if flat.size != 2 * counts.sum() or np.any(labels != np.round(labels)):
        raise ArchiveError(f"{what}: not 'label idx:value ...' lines (corrupt or truncated?)")
    pairs = flat.reshape(-1, 2)
    idx = pairs[:, 0].astype(np.int64)
    if len(idx) and (idx.min() < 1 or idx.max() > n_features or np.any(pairs[:, 0] != idx)):
        raise ArchiveError(f"{what}: feature indices outside 1..{n_features}")
    values = np.zeros((len(lines), n_features), dtype=np.float32)
    values[np.repeat(np.arange(len(lines)), counts), idx - 1] = pairs[:, 1]
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 1 or labels.max() > 10):
        raise ArchiveError(f"{what}: labels outside 1..10")
    values = np.clip(values, -1.0, 1.0)
    images = ((values + 1) / 2 * 255).astype(np.uint8)  # torchvision's USPS conversion (truncating)
    return images.reshape(-1, 1, 16, 16), labels - 1


def read_usps(dirs: list[Path]) -> Arrays:
    for d in dirs:
        train = find_file([d], "usps.bz2", ("usps",))
        test = find_file([d], "usps.t.bz2", ("usps.t",))
        if train and test:
            tx, ty = parse_usps(read_bytes(train), str(train))
            vx, vy = parse_usps(read_bytes(test), str(test))
            return tx, ty, vx, vy
    raise FileNotFoundError(f"usps: no usps.bz2 + usps.t.bz2 in {', '.join(str(d) for d in dirs)}")


# ----------------------------------------------------------------------------- SVHN-format .mat


def parse_digit_mat(data: bytes | Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """SVHN-format .mat (X: 32 x 32 x 3 x N uint8, y: N x 1) -> (uint8 N x 3 x 32 x 32, labels 0..9)."""
    import io

    import scipy.io

    try:
        mat = scipy.io.loadmat(io.BytesIO(data) if isinstance(data, bytes) else str(data))
    except Exception as exc:  # scipy raises several kinds for damaged files
        raise ArchiveError(f"{what}: cannot read the MATLAB file (corrupt or truncated?): {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise ArchiveError(f"{what}: the .mat file lacks the variables X and y")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
        raise ArchiveError(f"{what}: X has shape {x.shape}, expected H x W x 3 x {len(y)}")
    if x.dtype != np.uint8:
        x = np.clip(x, 0, 255).astype(np.uint8)
    y = np.where(y == 10, 0, y)
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise ArchiveError(f"{what}: labels outside 0..10")
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))), y


def read_svhn(dirs: list[Path]) -> Arrays:
    for d in dirs:
        train, test = find_file([d], "train_32x32.mat"), find_file([d], "test_32x32.mat")
        if train and test:
            return (*parse_digit_mat(train, str(train)), *parse_digit_mat(test, str(test)))
    raise FileNotFoundError(f"svhn: no train_32x32.mat + test_32x32.mat in {', '.join(str(d) for d in dirs)}")


# ----------------------------------------------------------------------------- SynDigits


def _syn_zip_members(zpath: Path) -> dict[str, str] | None:
    try:
        with zipfile.ZipFile(zpath) as zf:
            names = {n.rsplit("/", 1)[-1]: n for n in zf.namelist() if not n.startswith("__MACOSX")}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArchiveError(f"{zpath}: not a readable zip archive (corrupt or truncated?): {exc}") from exc
    return names if all(f in names for f in SYN_FILES) else None


def _syn_folder(d: Path) -> Path | None:
    for base in (d, d / "syn"):
        if (base / "train").is_dir() and ((base / "val").is_dir() or (base / "test").is_dir()):
            return base
    return None


def locate_syn(dirs: list[Path]) -> Path | None:
    """A folder with the two .mat files, the SynthDigits zip, or an FPL train/val image folder."""
    for d in dirs:
        if d.is_file() and zipfile.is_zipfile(d):
            return d
        if find_file([d], SYN_FILES[0]) and find_file([d], SYN_FILES[1]):
            return d
        z = d / SYN_REMOTE.filename
        if z.is_file():
            return z
        if d.is_dir() and _syn_folder(d) is not None:
            return _syn_folder(d)
    return None


def read_syn(dirs: list[Path]) -> Arrays:
    src = locate_syn(dirs)
    if src is None:
        raise FileNotFoundError(f"syndigits: no {SYN_REMOTE.filename}, {' + '.join(SYN_FILES)} or FPL syn/train + "
                                f"syn/val image folders in {', '.join(str(d) for d in dirs)}")
    if src.is_file():
        members = _syn_zip_members(src)
        if members is None:
            raise ArchiveError(f"{src}: the zip holds no {' and '.join(SYN_FILES)}")
        out = []
        with zipfile.ZipFile(src) as zf:
            for f in SYN_FILES:
                try:
                    data = zf.read(members[f])
                except (zipfile.BadZipFile, OSError, EOFError) as exc:
                    raise ArchiveError(f"{src}:{members[f]} (corrupt or truncated): {exc}") from exc
                out += parse_digit_mat(data, f"{src}:{members[f]}")
        return tuple(out)
    if (src / SYN_FILES[0]).is_file():
        return (*parse_digit_mat(src / SYN_FILES[0], str(src / SYN_FILES[0])),
                *parse_digit_mat(src / SYN_FILES[1], str(src / SYN_FILES[1])))
    arrays = read_image_folder(src, image_size=32, channels=3)
    if arrays.class_names != DIGIT_CLASSES:
        raise ValueError(f"{src}: class folders {arrays.class_names}, expected the digits 0..9")
    return arrays.train_x, arrays.train_y, arrays.test_x, arrays.test_y


# ----------------------------------------------------------------------------- single datasets


def _single(name: str, reader: Callable[[list[Path]], Arrays], mean=None, std=None,
            extra: tuple[str, ...] = ()) -> Callable[..., ArrayData]:
    def load(root: Path, path: str | None = None) -> ArrayData:
        tx, ty, vx, vy = reader(search_dirs(Path(root), (name,), path, extra))
        m, s = (mean, std) if mean is not None else channel_stats(tx)
        return ArrayData(train_x=torch.from_numpy(tx), train_y=torch.from_numpy(ty), test_x=torch.from_numpy(vx),
                         test_y=torch.from_numpy(vy), num_classes=10, mean=tuple(m),
                         std=tuple(v if v > 0 else 1.0 for v in s), class_names=DIGIT_CLASSES)

    load.__doc__ = f"Load {name} (path=: a folder holding its files; see the module docstring)."
    return load


load_usps = _single("usps", read_usps)
load_svhn = _single("svhn", read_svhn, SVHN_MEAN, SVHN_STD)
load_syndigits = _single("syndigits", read_syn)


# ----------------------------------------------------------------------------- digit_domains


@dataclass(frozen=True)
class _Domain:
    reader: Callable[[list[Path]], Arrays]
    locate: Callable[[list[Path]], list[Path] | None]  # the source files (for the cache key), or None


def _locate_idx(dirs: list[Path]) -> list[Path] | None:
    for d in dirs:
        files = [find_file([d], f, (f[:-3],)) for f in IDX_FILES]
        if all(files):
            return files
    return None


def _locate_pair(names: tuple[tuple[str, ...], tuple[str, ...]]) -> Callable[[list[Path]], list[Path] | None]:
    def locate(dirs: list[Path]) -> list[Path] | None:
        for d in dirs:
            a, b = find_file([d], names[0][0], names[0][1:]), find_file([d], names[1][0], names[1][1:])
            if a and b:
                return [a, b]
        return None
    return locate


DOMAIN_REMOTES = {"mnist": MNIST_REMOTES, "usps": USPS_REMOTES, "svhn": SVHN_REMOTES, "syn": (SYN_REMOTE,)}
DOMAIN_SOURCES = {
    "mnist": _Domain(lambda dirs: read_idx_dataset(dirs, "mnist"), _locate_idx),
    "usps": _Domain(read_usps, _locate_pair((("usps.bz2", "usps"), ("usps.t.bz2", "usps.t")))),
    "svhn": _Domain(read_svhn, _locate_pair((("train_32x32.mat",), ("test_32x32.mat",)))),
    "syn": _Domain(read_syn, lambda dirs: (lambda p: None if p is None else [p])(locate_syn(dirs))),
}


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 N x C x H x W -> N x C x size x size, PIL bilinear per channel (torchvision Resize on PIL)."""
    from PIL import Image

    if x.shape[2] == size and x.shape[3] == size:
        return x
    out = np.empty((x.shape[0], x.shape[1], size, size), dtype=np.uint8)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[i, c] = np.asarray(Image.fromarray(x[i, c]).resize((size, size), Image.Resampling.BILINEAR))
    return out


def subset(n: int, k: int | None, seed: int) -> np.ndarray:
    """k of n indices, a fixed random draw without replacement (all when k is None or >= n), sorted."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.RandomState(seed).choice(n, k, replace=False))


def _domain_dirs(root: Path, domain: str, paths: dict | None) -> list[Path]:
    if paths and domain in paths:
        return search_dirs(root, (), paths[domain])
    return search_dirs(root, ("digit_domains", DOMAIN_DATASET[domain]))


def _check_count(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _check_domains(domains) -> tuple[str, ...]:
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    unknown = [d for d in domains if d not in DOMAIN_SOURCES]
    if unknown or not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct names out of {', '.join(DIGIT_DOMAINS)}; got {list(domains)}")
    return domains


# ----------------------------------------------------------------------------- download step


def downloads_for(domains=DIGIT_DOMAINS) -> tuple[RemoteFile, ...]:
    """The upstream files of these domains, in DIGIT_DOMAINS order (MNIST: the 4 IDX files, USPS: 2 libsvm
    files, SVHN: 2 .mat files, syn: SynthDigits.zip, which has no checksum: a mirror entry must give one)."""
    domains = set(_check_domains(domains))
    return tuple(r for d in DIGIT_DOMAINS if d in domains for r in DOMAIN_REMOTES[d])


def _downloads_for_options(options) -> tuple[RemoteFile, ...]:
    """DatasetSpec hook: the files a run needs, from its loader options (a domain given by `paths=` needs none)."""
    domains = _check_domains(options.get("domains", DIGIT_DOMAINS))
    paths = options.get("paths") or {}
    return downloads_for(tuple(d for d in domains if d not in paths))


def _verifies(path: Path, remote: RemoteFile, mirror) -> bool:
    """`path` has the upstream checksum of `remote`, or the one a mirror entry configures for it."""
    sums = {mirror_checksum(remote)} | {mirror_checksum(remote, mirror)}
    return any(c is not None and verify(path, c) for c in sums)


def local_copies(root: str | Path, remotes, mirror=None) -> dict[str, Path]:
    """DatasetSpec hook: {file name: local copy} for the files of `remotes` that load_digit_domains already
    finds outside <root>/digit_domains/raw/ (e.g. <root>/mnist/raw/ from the `mnist` download), so the
    download step need not fetch them. A domain counts only as a whole, where the loader would read it:
    the first folder holding all its files, each matching its upstream checksum (or the one a mirror entry
    configures). SynDigits has no checksum: its files count wherever the loader finds them (raw/ included)."""
    root = Path(root)
    raw = root / "digit_domains" / "raw"
    names = {r.filename for r in remotes}
    out: dict[str, Path] = {}
    for domain, files in DOMAIN_REMOTES.items():
        wanted = [r.filename for r in files if r.filename in names]
        if not wanted:
            continue
        located = DOMAIN_SOURCES[domain].locate(_domain_dirs(root, domain, None))
        if located is None:
            continue
        if not all(r.md5 or r.sha256 for r in files):  # syn: nothing to verify, the loader's copy is used
            out.update({f: located[0] for f in wanted})
            continue
        if located[0].parent == raw:  # prepare() verifies (and if need be replaces) what is in raw/ itself
            continue
        by_name = {p.name: p for p in located}
        if all(r.filename in by_name and _verifies(by_name[r.filename], r, mirror) for r in files):
            out.update({f: by_name[f] for f in wanted})
        else:
            log.info("digit_domains: %s files in %s do not verify; they will be downloaded into %s",
                     domain, located[0].parent, raw)
    return out


def _syndigits_local_copies(root: str | Path, remotes, mirror=None) -> dict[str, Path]:
    """DatasetSpec hook of `syndigits`: a SynthDigits copy the loader finds (there is no checksum to verify)."""
    src = locate_syn(search_dirs(Path(root), ("syndigits",)))
    return {r.filename: src for r in remotes if r.filename == SYN_REMOTE.filename} if src is not None else {}


def load_digit_domains(root: Path, domains=DIGIT_DOMAINS, train_per_domain: int | None = FEDBN_TRAIN,
                       test_per_domain: int | None = FEDBN_TEST, subset_seed: int = 0, paths: dict | None = None,
                       cache: bool = True) -> ArrayData:
    """The digits feature-shift benchmark (see the module docstring for the options)."""
    root = Path(root)
    domains = _check_domains(domains)
    if paths and set(paths) - set(DOMAIN_SOURCES):
        raise ValueError(f"paths: unknown domains {sorted(set(paths) - set(DOMAIN_SOURCES))}")
    train_per_domain = _check_count("train_per_domain", train_per_domain)
    test_per_domain = _check_count("test_per_domain", test_per_domain)
    found, missing = [], []
    for name in domains:
        dirs = _domain_dirs(root, name, paths)
        files = DOMAIN_SOURCES[name].locate(dirs)
        if files is None:
            missing.append((name, dirs))
        else:
            found.append((name, dirs, files))
    if missing:  # never average over fewer domains than the experiment declares
        what = "; ".join(f"domain {n}: {', '.join(r.filename for r in DOMAIN_REMOTES[n])} not found in "
                         f"{', '.join(str(d) for d in dirs)}" for n, dirs in missing)
        kept = [n for n, _, _ in found]
        fix = (f"or drop it explicitly with the dataset option domains: [{', '.join(kept)}]" if kept
               else "or give paths=")
        raise FileNotFoundError(f"digit_domains: missing {what}. Download it (`mnist`, `usps`, `svhn`, "
                                f"`syndigits` or `digit_domains`), {fix}")
    xs, ys, ds, txs, tys, tds = [], [], [], [], [], []
    for did, (name, dirs, files) in enumerate(found):
        options = dict(domain=name, size=32, train_per_domain=train_per_domain, test_per_domain=test_per_domain,
                       subset_seed=subset_seed, files=[source_key(f) for f in files])
        cfile = cache_path(root / "digit_domains" / "cache", files[0], **options) if cache else None
        arrays = None
        if cfile is not None and cfile.is_file():
            try:
                arrays = load_npz(cfile)
            except Exception as exc:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring unreadable cache %s: %s", cfile, exc)
        if arrays is None:
            tx, ty, vx, vy = DOMAIN_SOURCES[name].reader(dirs)
            keep, tkeep = subset(len(ty), train_per_domain, subset_seed), subset(len(vy), test_per_domain, subset_seed)
            tx, vx = (resize_images(a, 32) for a in (tx[keep], vx[tkeep]))
            tx, vx = (np.repeat(a, 3, axis=1) if a.shape[1] == 1 else a for a in (tx, vx))
            arrays = FolderArrays(np.ascontiguousarray(tx), ty[keep], np.ascontiguousarray(vx), vy[tkeep],
                                  DIGIT_CLASSES)
            if cfile is not None:
                try:
                    save_npz(cfile, arrays)
                except OSError as exc:
                    log.warning("cannot write cache %s: %s", cfile, exc)
        log.info("digit_domains: %s: %d train / %d test", name, len(arrays.train_y), len(arrays.test_y))
        xs.append(arrays.train_x)
        ys.append(arrays.train_y)
        ds.append(np.full(len(arrays.train_y), did, dtype=np.int64))
        txs.append(arrays.test_x)
        tys.append(arrays.test_y)
        tds.append(np.full(len(arrays.test_y), did, dtype=np.int64))

    def cat(parts):
        return torch.from_numpy(np.concatenate(parts))

    return ArrayData(train_x=cat(xs), train_y=cat(ys), test_x=cat(txs), test_y=cat(tys), num_classes=10,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=DIGIT_CLASSES, train_domain=cat(ds),
                     test_domain=cat(tds), domain_names=tuple(n for n, _, _ in found))


register(DatasetSpec(name="usps", num_classes=10, loader=load_usps, default_model="cnn", default_augment="none",
                     train_size=7291, downloads=USPS_REMOTES,
                     description="USPS (libsvm), 16x16 grey, 7291 train / 2007 test"))
register(DatasetSpec(name="svhn", num_classes=10, loader=load_svhn, default_model="cnn", default_augment="none",
                     train_size=73257, downloads=SVHN_REMOTES,
                     description="SVHN cropped digits (.mat), 32x32 RGB, 73257 train / 26032 test"))
register(DatasetSpec(name="syndigits", num_classes=10, loader=load_syndigits, default_model="cnn",
                     default_augment="none", downloads=(SYN_REMOTE,), local_copies=_syndigits_local_copies,
                     description="SynDigits (Ganin & Lempitsky; SynthDigits.zip, SVHN .mat format), 32x32 RGB; no "
                                 "published checksum: give a mirror with the local copy's checksum"))
register(DatasetSpec(name="digit_domains", num_classes=10, loader=load_digit_domains, default_model="resnet10",
                     default_augment="crop_flip", domains=DIGIT_DOMAINS, downloads=downloads_for(DIGIT_DOMAINS),
                     downloads_for=_downloads_for_options, local_copies=local_copies,
                     description="digits feature shift (FPL): mnist, usps, svhn, syn at 32x32 RGB, FedBN-size "
                                 "subsets (743 train / 1860 test per domain); a missing domain is refused unless "
                                 "the dataset option `domains` leaves it out"))
