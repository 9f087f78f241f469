"""AG News (4 classes: World, Sports, Business, Sci/Tech) as int64 token ids.

Upstream: the two CSVs torchtext's `AG_NEWS` downloads (Zhang et al. 2015's
`ag_news_csv`, mirrored in the mhjabreel/CharCnn_Keras repository), with
torchtext's md5s: `train.csv` 120,000 rows (b1a00f826fdfbd249f79597b59e1dc12) and
`test.csv` 7,600 rows (d52ea96a97a2d943681189a97654912d; the offline copy
`ag_news_test.csv` has these very bytes). Each row is `"class","title","description"`
with class 1..4 (30,000 / 1,900 rows per class); label = class - 1. The text of a
row is title + " " + description (as torchtext joins them).

Where the CSVs are looked for: `path=` (a folder with train.csv/test.csv, an archive
such as fast.ai's `ag_news_csv.tgz` holding `ag_news_csv/{train,test}.csv`, or, with
`split_test_for_train`, the test CSV file itself), else `<root>/agnews/raw/` (where
`fedhpro.download.prepare` puts them), `<root>/agnews/` or `<root>/agnews/ag_news_csv/`,
else an archive in `<root>/agnews/raw/`.

Preprocessing (fixed, documented):
* tokenizer `basic_english`: the rules of torchtext's `basic_english` normaliser:
  lowercase; `'` -> ` '  `; `"` removed; `.` `,` `(` `)` `!` `?` get spaces around them;
  `<br />`, `;`, `:` become spaces; split on whitespace;
* vocabulary from the TRAINING split only: `<pad>`=0, `<unk>`=1, then tokens seen at
  least `min_freq` times (default 1), by decreasing count, ties alphabetical (torchtext's
  order), cut to `max_size` entries in all (default: no limit); test-only and rare words
  map to `<unk>`;
* every text truncated to its first `max_len` tokens (default 200, HtFLlib's AG News
  setting; 99% of the texts have at most 85 tokens) and right-padded with 0:
  `train_x`/`test_x` are int64 N x max_len.
* `mean`/`std` are None (not images: no normalisation, no augmentation);
  `model_kwargs = {"vocab_size": V}` for the text backbones (`fedhpro.text`).

Offline fallback (NOT the paper protocol): the 120,000-row train.csv is not available
offline. `split_test_for_train=True` ignores train.csv and splits test.csv instead: a
fixed stratified split (`test_fraction`=0.2 of each class, seed `split_seed`=0): 6,080
train (1,520 per class) / 1,520 test (380 per class); the vocabulary comes from that train
part. The dataset `agnews_testsplit` is the same loader with this option switched on
(its download step fetches only test.csv), for pipeline runs, which pass no loader
options; its results must not be reported as AG News results.

The encoded arrays are cached as `<root>/agnews/cache/<key>.npz`, the key hashing the
sources (path, size, mtime) and all options.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import tarfile
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np

from fedhpro.lazy import lazy_module
from fedhpro.runio import atomic_savez
from fedhpro.data.registry import ArrayData, DatasetSpec, register
from fedhpro.data.imagefolder import cache_path, is_archive, source_key
from fedhpro.download import ArchiveError, RemoteFile

torch = lazy_module("torch")

log = logging.getLogger(__name__)

AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
DEFAULT_MAX_LEN = 200

_BASE = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/"
AGNEWS_TRAIN_REMOTE = RemoteFile(_BASE + "train.csv", "train.csv", md5="b1a00f826fdfbd249f79597b59e1dc12")
AGNEWS_TEST_REMOTE = RemoteFile(_BASE + "test.csv", "test.csv", md5="d52ea96a97a2d943681189a97654912d")
TRAIN_ROWS, TEST_ROWS = 120000, 7600


# ----------------------------------------------------------------------------- tokenizer and vocabulary

_RULES = [(re.compile(p), r) for p, r in (
    (r"\'", " '  "), (r"\"", ""), (r"\.", " . "), (r"<br \/>", " "), (r",", " , "), (r"\(", " ( "),
    (r"\)", " ) "), (r"\!", " ! "), (r"\?", " ? "), (r"\;", " "), (r"\:", " "), (r"\s+", " "))]


def tokenize(text: str) -> list[str]:
    """torchtext's `basic_english`: lowercase, split off basic punctuation, split on whitespace."""
    text = text.lower()
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def build_vocab(token_lists: Iterable[Sequence[str]], min_freq: int = 1, max_size: int | None = None) -> list[str]:
    """[<pad>, <unk>, tokens by decreasing count (ties alphabetical) with count >= min_freq][:max_size]."""
    if min_freq < 1:
        raise ValueError(f"min_freq must be >= 1, got {min_freq}")
    if max_size is not None and max_size < 2:
        raise ValueError(f"max_size must be >= 2 (room for {PAD} and {UNK}), got {max_size}")
    counts: Counter[str] = Counter()
    for tokens in token_lists:
        counts.update(tokens)
    counts.pop(PAD, None)
    counts.pop(UNK, None)
    words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
    vocab = [PAD, UNK, *words]
    return vocab if max_size is None else vocab[:max_size]


def encode(token_lists: Sequence[Sequence[str]], vocab: Sequence[str] | dict[str, int], max_len: int) -> np.ndarray:
    """Token ids, truncated to max_len and right-padded with <pad>=0 -> int64 N x max_len."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    index = vocab if isinstance(vocab, dict) else {w: i for i, w in enumerate(vocab)}
    out = np.full((len(token_lists), max_len), PAD_ID, dtype=np.int64)
    for i, tokens in enumerate(token_lists):
        ids = [index.get(t, UNK_ID) for t in tokens[:max_len]]
        out[i, :len(ids)] = ids
    return out


# ----------------------------------------------------------------------------- CSV reading


def parse_csv(data: bytes, what: str, num_classes: int = 4) -> tuple[list[str], np.ndarray]:
    """Upstream CSV bytes -> (texts, int64 labels 0..num_classes-1); ValueError naming the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: not UTF-8 text ({exc})") from exc
    texts, labels = [], []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != 3:
                raise ValueError(f"{what}: line {reader.line_num}: {len(row)} fields, expected 3 "
                                 "(\"class\",\"title\",\"description\")")
            if not row[0].strip().isdigit() or not 1 <= int(row[0]) <= num_classes:
                raise ValueError(f"{what}: line {reader.line_num}: class {row[0]!r} is not 1..{num_classes}")
            labels.append(int(row[0]) - 1)
            texts.append(row[1] + " " + row[2])
    except csv.Error as exc:
        raise ValueError(f"{what}: line {reader.line_num}: malformed CSV ({exc})") from exc
    if not texts:
        raise ValueError(f"{what}: no rows")
    return texts, np.array(labels, dtype=np.int64)


def _archive_csvs(archive: Path) -> dict[str, bytes]:
    """{'train.csv': bytes, 'test.csv': bytes} found (by base name, shallowest) in a tar/zip."""
    found: dict[str, tuple[int, bytes]] = {}

    def offer(name: str, read) -> None:
        parts = PurePosixPath(name).parts
        if parts and parts[-1] in ("train.csv", "test.csv") and not any(p.startswith(".") for p in parts):
            if parts[-1] not in found or len(parts) < found[parts[-1]][0]:
                found[parts[-1]] = (len(parts), read())

    try:
        if zipfile.is_zipfile(archive) and not tarfile.is_tarfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        offer(info.filename, lambda i=info: zf.read(i))
        else:
            with tarfile.open(archive, "r:*") as tf:
                for m in tf:
                    if m.isfile():
                        offer(m.name, lambda m=m: tf.extractfile(m).read())
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ArchiveError(f"cannot read {archive} (corrupt or truncated?): {exc}") from exc
    return {k: v for k, (_, v) in found.items()}


def _csv_dir(d: Path) -> Path | None:
    for c in (d, d / "ag_news_csv"):
        if (c / "test.csv").is_file():
            return c
    return None


def locate(root: Path, path: str | Path | None, need_train: bool, name: str = "agnews",
           fallback: str | None = None) -> tuple[Path, Path | None]:
    """(test source, train source or None): CSV files, or one archive for both."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{name}: path {p} does not exist")
        candidates = [p]
    else:
        candidates = []
        for n in (name, fallback):
            if n:
                base = Path(root) / n
                candidates += [base / "raw", base]
    for c in candidates:
        if c.is_dir():
            d = _csv_dir(c)
            if d is not None and (not need_train or (d / "train.csv").is_file()):
                return d / "test.csv", (d / "train.csv" if need_train else None)
        elif c.is_file() and not is_archive(c):  # a CSV file: the test split
            if need_train:
                raise ValueError(f"{name}: {c} is a single CSV; give the folder holding train.csv and test.csv, "
                                 "or use split_test_for_train=True to split this file")
            return c, None
        elif c.is_file():
            return c, (c if need_train else None)
    for c in candidates:
        archives = sorted(p for p in c.iterdir() if is_archive(p) and not p.name.startswith(".")) \
            if c.is_dir() else []
        if archives:
            return archives[0], (archives[0] if need_train else None)
    wanted = "train.csv and test.csv" if need_train else "test.csv"
    where = ", ".join(str(c) for c in candidates)
    hint = "" if not need_train else (
        "; offline, where only test.csv exists, split_test_for_train=True (dataset agnews_testsplit) makes a "
        "fixed train/test split of test.csv (NOT the paper protocol)")
    raise FileNotFoundError(f"no AG News {wanted} in {where}: download them (fedhpro.download.prepare puts them "
                            f"into {Path(root) / name / 'raw'}) or give path={hint}")


def _read_source(source: Path, member: str) -> bytes:
    if is_archive(source):
        blobs = _archive_csvs(source)
        if member not in blobs:
            raise ValueError(f"{source}: no {member} inside (expected ag_news_csv/train.csv and test.csv)")
        return blobs[member]
    return source.read_bytes()


# ----------------------------------------------------------------------------- split and cache


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-class split -> (train indices, test indices), each sorted (file order kept)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _encode_all(test_source: Path, train_source: Path | None, *, max_len: int, min_freq: int,
                max_size: int | None, split_test_for_train: bool, test_fraction: float,
                split_seed: int) -> dict[str, np.ndarray]:
    test_texts, test_y = parse_csv(_read_source(test_source, "test.csv"), f"{test_source}:test.csv")
    if split_test_for_train:
        tr, te = stratified_split(test_y, test_fraction, split_seed)
        train_texts, train_y = [test_texts[i] for i in tr], test_y[tr]
        test_texts, test_y = [test_texts[i] for i in te], test_y[te]
    else:
        train_texts, train_y = parse_csv(_read_source(train_source, "train.csv"), f"{train_source}:train.csv")
    train_tokens = [tokenize(t) for t in train_texts]
    vocab = build_vocab(train_tokens, min_freq=min_freq, max_size=max_size)
    index = {w: i for i, w in enumerate(vocab)}
    return {"train_x": encode(train_tokens, index, max_len), "train_y": train_y,
            "test_x": encode([tokenize(t) for t in test_texts], index, max_len), "test_y": test_y,
            "vocab": np.frombuffer("\n".join(vocab).encode("utf-8"), dtype=np.uint8)}


def vocab_of(arrays: dict[str, np.ndarray]) -> list[str]:
    return bytes(arrays["vocab"]).decode("utf-8").split("\n")


# ----------------------------------------------------------------------------- loaders


def load_agnews_arrays(root: Path, path: str | None = None, *, max_len: int = DEFAULT_MAX_LEN, min_freq: int = 1,
                       max_size: int | None = None, split_test_for_train: bool = False, test_fraction: float = 0.2,
                       split_seed: int = 0, cache: bool = True, name: str = "agnews") -> dict[str, np.ndarray]:
    """The encoded arrays (train_x, train_y, test_x, test_y, vocab as newline-joined UTF-8 bytes)."""
    test_source, train_source = locate(Path(root), path, need_train=not split_test_for_train, name=name,
                                       fallback="agnews" if name != "agnews" else None)
    options = {"max_len": max_len, "min_freq": min_freq, "max_size": max_size,
               "split_test_for_train": split_test_for_train, "test_fraction": test_fraction if split_test_for_train
               else None, "split_seed": split_seed if split_test_for_train else None}
    cpath = None
    if cache:
        cpath = cache_path(Path(root) / name / "cache", test_source, kind="agnews",
                           train=source_key(train_source) if train_source else None, **options)
        if cpath.is_file():
            try:
                with np.load(cpath, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            except Exception as exc:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring unreadable cache %s: %s", cpath, exc)
    log.info("agnews: encoding %s%s", test_source, f" and {train_source}" if train_source else "")
    arrays = _encode_all(test_source, train_source, max_len=max_len, min_freq=min_freq, max_size=max_size,
                         split_test_for_train=split_test_for_train, test_fraction=test_fraction,
                         split_seed=split_seed)
    if cpath is not None:
        try:
            atomic_savez(cpath, arrays)
        except OSError as exc:
            log.warning("cannot write cache %s: %s", cpath, exc)
    return arrays


def load_agnews(root: Path, path: str | None = None, max_len: int = DEFAULT_MAX_LEN, min_freq: int = 1,
                max_size: int | None = None, split_test_for_train: bool = False, test_fraction: float = 0.2,
                split_seed: int = 0, cache: bool = True, _name: str = "agnews", **_) -> ArrayData:
    """AG News as token ids (see the module docstring for sources, preprocessing and the offline split)."""
    a = load_agnews_arrays(root, path, max_len=max_len, min_freq=min_freq, max_size=max_size,
                           split_test_for_train=split_test_for_train, test_fraction=test_fraction,
                           split_seed=split_seed, cache=cache, name=_name)
    vocab_size = len(vocab_of(a))
    return ArrayData(train_x=torch.from_numpy(a["train_x"]), train_y=torch.from_numpy(a["train_y"]),
                     test_x=torch.from_numpy(a["test_x"]), test_y=torch.from_numpy(a["test_y"]), num_classes=4,
                     mean=None, std=None, class_names=AGNEWS_CLASSES, model_kwargs={"vocab_size": vocab_size})


def load_agnews_testsplit(root: Path, path: str | None = None, **options) -> ArrayData:
    """Offline stand-in: AG News test.csv split into train/test (NOT the paper protocol)."""
    options.pop("split_test_for_train", None)
    return load_agnews(root, path, split_test_for_train=True, _name="agnews_testsplit", **options)


register(DatasetSpec(name="agnews", num_classes=4, loader=load_agnews, default_model="text_embedding_bag",
                     default_augment="none", train_size=TRAIN_ROWS,
                     downloads=(AGNEWS_TRAIN_REMOTE, AGNEWS_TEST_REMOTE),
                     description="AG News, 4 classes, 120000 train / 7600 test texts as int64 token ids "
                                 f"(basic_english, train vocabulary, {DEFAULT_MAX_LEN} tokens)"))
register(DatasetSpec(name="agnews_testsplit", num_classes=4, loader=load_agnews_testsplit,
                     default_model="text_embedding_bag", default_augment="none", train_size=6080,
                     downloads=(AGNEWS_TEST_REMOTE,),
                     description="OFFLINE STAND-IN, not the paper protocol: AG News test.csv split 80/20 per "
                                 "class (seed 0) into 6080 train / 1520 test texts"))
