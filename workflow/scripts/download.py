"""Snakemake script of rule download: fetch a dataset's needed files (verified) and write the marker.

params.files names the files the sweep's runs need (common.smk); those the dataset's loader already
finds locally (DatasetSpec.find_local_copies: verified where a checksum exists) are not fetched, the rest
go through fedhpro.download.prepare into <data_root>/<dataset>/raw/ (a file already there and
verified is not fetched again either). A local copy whose bytes differ from upstream (recompressed) is
accepted by its content when `mirrors.<dataset>.fingerprint` gives the dataset fingerprint (one key for the
whole dataset; `fedhpro fingerprint` prints it). The marker lists every file and where it is.
"""

import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

sm = snakemake  # noqa: F821  (injected by Snakemake)
REPO = Path(sm.scriptdir).resolve().parents[1]
if (REPO / "fedhpro").is_dir():  # this checkout's package (else the installed one)
    sys.path.insert(0, str(REPO))

with open(sm.log[0], "w") as log, redirect_stdout(log), redirect_stderr(log):
    try:
        import logging

        from fedhpro.data import DATASETS, FINGERPRINT_KEY, check_fingerprint_text, prepare_by_content
        from fedhpro.download import ChecksumError, prepare
        from fedhpro.runio import atomic_write_text

        logging.basicConfig(level=logging.INFO, stream=log)
        dataset = sm.wildcards.dataset
        spec = DATASETS[dataset]
        names = list(sm.params.files)
        by_name = {r.filename: r for r in spec.downloads}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"{dataset} has no download files {unknown}")
        remotes = [by_name[n] for n in names]
        mirror = {k: v for k, v in dict(sm.params.mirror).items()} or None
        root = Path(sm.params.data_root)
        local = spec.find_local_copies(root, remotes, mirror)
        for name, path in local.items():
            logging.info("%s: %s found locally at %s; not fetched", dataset, name, path)
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
            logging.info("%s: bytes differ from upstream; checking the copy's content fingerprint", dataset)
            raw = prepare_by_content(dataset, fetch, root, mirror, check_fingerprint_text(
                pinned, f"mirrors.{dataset}.{FINGERPRINT_KEY}"))
            logging.info("%s: accepted by content fingerprint %s", dataset, pinned)
        # every fetched file verified its checksum inside prepare(); only now does the marker appear
        lines = [f"{n}\t{local.get(n, raw)}" for n in names]  # where each file is (raw/: fetched or verified)
        atomic_write_text(Path(sm.output[0]), f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n" + "\n".join(lines) + "\n")
    except BaseException:
        traceback.print_exc()
        raise SystemExit(f"download failed: {sys.exc_info()[1]} (full log: {sm.log[0]})") from None
