"""The work of the workflow's download and partition rules, as plain functions: the Snakemake scripts
(workflow/scripts/download.py, partition.py) only unpack their rule's params and call these.

A module of its own (imported by nothing in the package) because it joins the dataset registry, the
downloader, the partitioner and the run setup of `fedhpro.train`, which import one another the other way.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["download_files", "write_partition"]

log = logging.getLogger(__name__)


def download_files(dataset: str, names: Sequence[str], root: str | Path, mirror: Mapping | None,
                   marker: str | Path) -> list[str]:
    """Make the `names` files of `dataset` available (verified) and then write the `marker`.

    Files the dataset's loader already finds locally (DatasetSpec.find_local_copies: verified where a
    checksum exists) are not fetched; the rest go through fedhpro.download.prepare into
    <root>/<dataset>/raw/ (a file already there and verified is not fetched again either). A local copy
    whose bytes differ from upstream (recompressed) is accepted by its content when
    `mirrors.<dataset>.fingerprint` gives the dataset fingerprint (one key for the whole dataset; `fedhpro
    fingerprint` prints it). The marker, written atomically only after every file verified, lists every
    file and where it is; returns those lines (name TAB folder).
    """
    from fedhpro.data import DATASETS, FINGERPRINT_KEY, check_fingerprint_text, prepare_by_content
    from fedhpro.download import ChecksumError, prepare
    from fedhpro.runio import atomic_write_text

    spec = DATASETS[dataset]
    names = list(names)
    by_name = {r.filename: r for r in spec.downloads}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"{dataset} has no download files {unknown}")
    remotes = [by_name[n] for n in names]
    mirror = dict(mirror or {}) or None
    root = Path(root)
    local = spec.find_local_copies(root, remotes, mirror)
    for name, path in local.items():
        log.info("%s: %s found locally at %s; not fetched", dataset, name, path)
    fetch = [r for r in remotes if r.filename not in local]
    pinned = (mirror or {}).get(FINGERPRINT_KEY)
    try:
        raw = prepare(fetch, root, dataset, mirror=mirror)
    except ChecksumError as err:
        if not pinned:
            raise ChecksumError(f"{err}. If your copy differs from upstream only in compression or packaging, "
                                f"accept it by its content with the one key mirrors.{dataset}.{FINGERPRINT_KEY}: "
                                f"'<the output of: fedhpro fingerprint --dataset {dataset} --path <your "
                                "folder>>' (or use datasets.<name>.dataset_options.path)") from None
        log.info("%s: bytes differ from upstream; checking the copy's content fingerprint", dataset)
        raw = prepare_by_content(dataset, fetch, root, mirror, check_fingerprint_text(
            pinned, f"mirrors.{dataset}.{FINGERPRINT_KEY}"))
        log.info("%s: accepted by content fingerprint %s", dataset, pinned)
    # every fetched file verified its checksum inside prepare(); only now does the marker appear
    lines = [f"{n}\t{local.get(n, raw)}" for n in names]  # where each file is (raw/: fetched or verified)
    atomic_write_text(Path(marker), f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n" + "\n".join(lines) + "\n")
    return lines


def write_partition(cfg: Any, out_dir: str | Path, spec: Mapping[str, Any],
                    pinned_fingerprint: str | None = None, content: str | None = None) -> str:
    """Split the training labels of `cfg`'s dataset over its clients, as `train()` would without a saved
    partition (`fedhpro.train.client_partition`), and save it into `out_dir` with `spec` (the split's keys)
    and the data's identity in meta.json. `pinned_fingerprint` (`mirrors.<dataset>.fingerprint`): the data
    loaded must have that content fingerprint (RuntimeError otherwise). `content`: the fingerprint the workflow
    read from data given by path when it was loaded; data that changed since is a RuntimeError (run the
    workflow again, so that it reruns what that data makes out of date). Returns the report: the data
    fingerprint and the client x class count table."""
    from fedhpro import partition
    from fedhpro.data import fingerprint, load_dataset
    from fedhpro.train import client_partition, run_partition_identity

    data = load_dataset(cfg.dataset, cfg.data_root, **dict(cfg.dataset_options))
    labels = data.train_y.numpy()
    domains = data.train_domain.numpy() if data.train_domain is not None else None
    parts = client_partition(cfg, labels, None, domains)
    identity = run_partition_identity(cfg, fingerprint(data))
    if pinned_fingerprint and identity["data_fingerprint"] != pinned_fingerprint.strip().lower():
        raise RuntimeError(f"the {cfg.dataset} data loaded has content fingerprint {identity['data_fingerprint']}, "
                           f"but mirrors.{cfg.dataset}.fingerprint says {pinned_fingerprint}; it is other data")
    if content and identity["data_fingerprint"] != content:
        raise RuntimeError(f"the {cfg.dataset} data at {dict(cfg.dataset_options).get('path')} changed since the "
                           f"workflow was loaded (content fingerprint {content}, now {identity['data_fingerprint']}); "
                           "run snakemake again (if the data did not change, delete <results>/.cache/"
                           "data-fingerprints.json, the workflow's cache of such fingerprints)")
    meta = {**spec, "num_train": int(len(labels)), "identity": identity}
    partition.save_partition(Path(out_dir), parts, labels, data.num_classes, meta)
    counts = partition.client_class_counts(labels, parts, data.num_classes)
    return f"data fingerprint {identity['data_fingerprint']}\n{partition.format_count_table(counts)}"
