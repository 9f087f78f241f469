"""Dataset registry.

Every dataset is a `DatasetSpec` registered here; its loader returns an
`ArrayData`: tensor-resident train/test samples (uint8 images N x C x H x W, or
token ids) with int64 labels, plus the normalisation the papers use. Training
code keeps these tensors in memory (on the device for CUDA) and normalises and
augments batches on the fly, so no DataLoader is ever rebuilt.

New datasets slot in by adding a module that calls `fedhpro.data.registry.register(...)`
and importing it at the bottom of this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from fedhpro.data.registry import DATASETS, ArrayData, DatasetSpec, register

__all__ = ["ArrayData", "DatasetSpec", "DATASETS", "register", "plan_downloads", "fingerprint",
           "FINGERPRINT_KEY", "check_fingerprint_text", "prepare_by_content", "path_fingerprint", "local_copy_checksum", "cached_by_stat",
           "load_dataset"]


def plan_downloads(requests, root: str | Path, mirrors: Mapping | None = None, *, pending=(),
                   warn: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """What the workflow's download step fetches: {dataset: names of its needed files, in `downloads` order}.

    requests: (dataset, loader options) of every run; a dataset's files are the union of
    DatasetSpec.needed_downloads over its runs' options (e.g. digit_domains with `domains: [mnist, usps]`:
    the MNIST and USPS files only); datasets with nothing to download are left out. mirrors: dataset ->
    `prepare` mirror mapping (the workflow's `mirrors:`). A needed file with no checksum to verify it
    (neither upstream nor in its mirror entry; e.g. SynDigits) and no local copy (find_local_copies) is a
    ValueError whose one-line message says how to provide it; for a dataset in `pending` it is instead
    dropped with `warn(message)`. Checks no checksums of files (cheap enough for workflow load).
    """
    from fedhpro.download import mirror_checksum

    mirrors = mirrors or {}
    needed: dict[str, dict[str, Any]] = {}  # dataset -> file name -> the first options that need it
    for dataset, options in requests:
        spec = DATASETS[dataset]
        if not spec.downloads:
            continue
        try:
            files = spec.needed_downloads(options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"dataset_options of {dataset}: {err}") from None
        for remote in files:
            needed.setdefault(dataset, {}).setdefault(remote.filename, dict(options or {}))
    plan = {}
    for dataset, wanted in needed.items():
        spec = DATASETS[dataset]
        mirror = mirrors.get(dataset) or {}
        if FINGERPRINT_KEY in mirror:
            check_fingerprint_text(mirror[FINGERPRINT_KEY], f"mirrors.{dataset}.{FINGERPRINT_KEY}")
        remotes = [r for r in spec.downloads if r.filename in wanted]
        unverifiable = []
        for remote in remotes:
            try:
                if mirror_checksum(remote, mirror) is None:
                    unverifiable.append(remote)
            except ValueError as err:
                raise ValueError(f"mirrors.{dataset}.{remote.filename}: {err}") from None
        if unverifiable:
            local = spec.find_local_copies(root, unverifiable, mirror)
            unverifiable = [r for r in unverifiable if r.filename not in local]
        if unverifiable:
            names = [r.filename for r in unverifiable]
            one = len(names) == 1
            options = wanted[names[0]]
            by = (f"dataset_options {json.dumps(options, sort_keys=True, default=str)}" if options
                  else "the default dataset_options")
            message = (f"mirrors.{dataset}: {', '.join(names)} (needed by {dataset} with {by}) "
                       f"{'has' if one else 'have'} no published checksum and no local copy was found under "
                       f"{root}; provide {'it' if one else 'them'} in the workflow config as mirrors: {{{dataset}: "
                       f"{{{names[0] if one else '<file>'}: {{url: <path or URL>, checksum: 'sha256:<hex>'}}}}}}, "
                       f"or place {'it' if one else 'them'} by hand in {Path(root) / dataset / 'raw'}/ "
                       f"(see {spec.loader.__module__})")
            if dataset not in pending:
                raise ValueError(message)
            (warn or (lambda m: None))(f"{message}; not downloaded (pending dataset)")
        names = [r.filename for r in remotes if r not in unverifiable]
        if names:
            plan[dataset] = names
    return dict(sorted(plan.items()))


def fingerprint(data: ArrayData) -> str:
    """The content identity of prepared data: 'sha256:<hex>' over every array (shape, dtype and bytes),
    the class count and the domain names. Where the files live, how they were compressed or archived
    and which mirror they came from do not enter it; any change to a sample, label or split does."""
    import hashlib

    h = hashlib.sha256(b"fedhpro-data-fingerprint-1\n")
    h.update(json.dumps({"num_classes": int(data.num_classes), "domain_names": list(data.domain_names)},
                        sort_keys=True).encode())
    for name in ("train_x", "train_y", "test_x", "test_y", "train_domain", "test_domain"):
        t = getattr(data, name)
        if t is None:
            h.update(f"\n{name}:none".encode())
            continue
        arr = t.detach().cpu().contiguous().numpy()
        h.update(f"\n{name}:{arr.dtype.str}:{list(arr.shape)}\n".encode())
        h.update(memoryview(arr.reshape(-1).view("u1")))
    return "sha256:" + h.hexdigest()


FINGERPRINT_KEY = "fingerprint"  # mirrors.<dataset>.fingerprint: accept a local copy by its content


def check_fingerprint_text(text: Any, where: str) -> str:
    """A 'sha256:<64 hex>' fingerprint, or ValueError naming `where`."""
    import re

    if not isinstance(text, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", text.strip().lower()):
        raise ValueError(f"{where} must be a dataset fingerprint 'sha256:<64 hex>' (as printed by `fedhpro "
                         f"fingerprint`), got {text!r}")
    return text.strip().lower()


def prepare_by_content(name: str, remotes, root: str | Path, mirror: Mapping, expected: str) -> Path:
    """Accept a local copy whose bytes differ from upstream (e.g. recompressed) by its content.

    Copies the `remotes` from their mirror location (a local folder: `mirror["*"]` or per-file entries) into a
    staging folder (each copy verified against its source's sha256), loads them with the dataset's loader
    (`path=` the staging folder) and compares `fingerprint(data)` with `expected` (the one key
    `mirrors.<dataset>.fingerprint`). Only on a match are the files moved into `<root>/<name>/raw/`; otherwise
    ValueError naming both fingerprints, and raw/ is left as it was. Returns raw/.
    """
    import os
    import shutil
    import tempfile
    import urllib.parse
    import urllib.request

    from fedhpro.download import mirror_entry, source_url, fetch, file_checksum

    spec = DATASETS[name]
    import inspect

    if "path" not in inspect.signature(spec.loader).parameters:
        raise ValueError(f"mirrors.{name}.{FINGERPRINT_KEY}: dataset {name!r} has no path= option to load a copy "
                         "from; give each file's checksum under mirrors instead")
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".content-", dir=raw.parent))
    try:
        for remote in remotes:
            target, url, _ = mirror_entry(mirror, remote)
            source = source_url(target, url)
            parsed = urllib.parse.urlparse(source)
            if parsed.scheme != "file":
                raise ValueError(f"mirrors.{name}.{FINGERPRINT_KEY}: acceptance by content needs a local copy (a "
                                 f"folder or file:// URL); {target.filename} comes from {source}")
            local = Path(urllib.request.url2pathname(parsed.path))
            if not local.is_file():
                raise FileNotFoundError(f"mirrors.{name}: {local} does not exist")
            fetch(target, staging, mirror_url=source, checksum="sha256:" + file_checksum(local, "sha256"))
        data = spec.loader(Path(root), path=str(staging))
        found = fingerprint(data)
        if found != expected:
            raise ValueError(f"the copy of {name} at {mirror.get('*') or 'the mirror'} has content fingerprint "
                             f"{found}, but mirrors.{name}.{FINGERPRINT_KEY} says {expected}; it is other data")
        for f in staging.iterdir():
            if not f.name.startswith("."):
                os.replace(f, raw / f.name)
        return raw
    finally:
        shutil.rmtree(staging, ignore_errors=True)


STAT_CACHE_VERSION = 1


def cached_by_stat(cache_file: str | Path | None, key: Mapping[str, Any], source: str | Path,
                   compute: Callable[[], str]) -> str:
    """`compute()` (a content identity, which costs a read of `source`), kept in the JSON `cache_file` under
    `key` and the name, size, mtime, inode and ctime of every file of `source` (`imagefolder.source_key`):
    while no file changes, the value is read back; a touched file costs one `compute()` (the same value if the
    bytes did not change). An unreadable or unwritable cache is ignored; errors of `compute` propagate."""
    import hashlib

    from fedhpro.data.imagefolder import source_key
    from fedhpro.runio import atomic_write_text

    entry_key = hashlib.sha256(json.dumps({"v": STAT_CACHE_VERSION, **key, "source": source_key(source)},
                                          sort_keys=True, default=str).encode()).hexdigest()
    cache: dict[str, Any] = {}
    if cache_file is not None:
        try:
            loaded = json.loads(Path(cache_file).read_text())
            cache = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            cache = {}
        entry = cache.get(entry_key)
        if isinstance(entry, dict) and isinstance(entry.get("value"), str):
            return entry["value"]
    value = compute()
    if cache_file is not None:
        cache[entry_key] = {"value": value, "source": str(source), **{k: str(v) for k, v in key.items()}}
        cache = dict(list(cache.items())[-500:])  # the newest entries; old sources drop out
        try:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_file, json.dumps(cache, indent=1, sort_keys=True))
        except OSError:
            pass  # a cache only saves time
    return value


def path_fingerprint(name: str, root: str | Path, options: Mapping[str, Any], cache_file: str | Path | None = None,
                     ) -> str:
    """The content fingerprint (`fingerprint`) of dataset `name` loaded with `options`, whose `path` gives the
    data (a folder or an archive, e.g. a user's own copy): what the workflow identifies such data by, so that
    other data under the same path reruns the partitions and runs made from it, and moved data reruns nothing.
    Loading is the cost, so the value is cached by the files' stats (`cached_by_stat`)."""
    options = dict(options)
    return cached_by_stat(cache_file, {"kind": "dataset-fingerprint", "dataset": name, "options": options},
                          options["path"], lambda: fingerprint(load_dataset(name, root, **options)))


def local_copy_checksum(path: str | Path, cache_file: str | Path | None = None) -> str:
    """'sha256:<hex>' of a file placed by hand (no published checksum), or of every file of a folder with its
    relative name: what such a copy is, for the workflow's data identity; cached by the files' stats."""
    import hashlib

    from fedhpro.data.imagefolder import walk_files
    from fedhpro.download import file_checksum

    def compute() -> str:
        source = Path(path)
        if source.is_file():
            return "sha256:" + file_checksum(source, "sha256")
        h = hashlib.sha256()
        for full, rel in walk_files(source):
            h.update(f"{rel}\0{file_checksum(full, 'sha256')}\n".encode())
        return "sha256-tree:" + h.hexdigest()

    return cached_by_stat(cache_file, {"kind": "file-checksum"}, path, compute)


def option_names(name: str) -> list[str]:
    """The options (`dataset_options` keys) the loader of dataset `name` takes."""
    import inspect

    return [n for n, p in inspect.signature(DATASETS[name].loader).parameters.items()
            if n != "root" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def cli_options(name: str, path: str | None) -> dict[str, Any]:
    """The loader options of a command's `--path` (fingerprint, partition); ValueError naming the flag when
    the dataset reads no path (built-in data such as digits)."""
    if name not in DATASETS:
        raise ValueError(f"--dataset: unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    if path is None:
        return {}
    if "path" not in option_names(name):
        raise ValueError(f"--path: dataset {name!r} reads no path (its data is built in or found under "
                         f"--data-root); leave --path out")
    return {"path": path}


def load_dataset(name: str, root: str | Path = "data", **options) -> ArrayData:
    """The dataset's arrays; ValueError naming the dataset for an option its loader does not take, and for data
    with fewer than 2 classes (a classifier trained on one class scores 1.0 and says nothing)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    accepted = option_names(name)
    for key in options:
        if key not in accepted:
            raise ValueError(f"dataset {name!r} has no option {key!r}; accepted: {', '.join(accepted) or '(none)'}")
    data = DATASETS[name].loader(Path(root), **options)
    present = int(data.train_y.unique().numel()) if len(data.train_y) else 0
    if data.num_classes < 2 or present < 2:
        where = f" ({options['path']})" if options.get("path") else ""
        raise ValueError(f"dataset {name!r}{where} holds {min(present, data.num_classes)} class(es) in its training "
                         "data; a classifier needs at least 2 (its accuracy would be 1.0 and mean nothing)")
    return data


from fedhpro.data import digits  # noqa: E402,F401  (registers)
from fedhpro.data import cifar, imagefolder  # noqa: E402,F401
from fedhpro.data import agnews, ham10000, sun397, tinyimagenet  # noqa: E402,F401
from fedhpro.data import digit_domains, mnist_family, office  # noqa: E402,F401
