"""Snakemake script of rule partition: split a dataset's training labels over clients and save it."""

import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

sm = snakemake  # noqa: F821  (injected by Snakemake)
REPO = Path(sm.scriptdir).resolve().parents[1]
if (REPO / "fedhpro").is_dir():  # this checkout's package (else the installed one)
    sys.path.insert(0, str(REPO))

with open(sm.log[0], "w") as log, redirect_stdout(log), redirect_stderr(log):
    try:
        from fedhpro import partition
        from fedhpro.data import fingerprint, load_dataset
        from fedhpro.sweep import workflow_run
        from fedhpro.train import client_partition, run_partition_identity

        # the params hold the split's identity only; where the data lives comes from the workflow config
        run = workflow_run(sm.config, sm.wildcards)
        spec = dict(sm.params.spec)
        if run.partition().params() != spec:
            raise RuntimeError(f"partition {run.partition_id}: the workflow config changed since the DAG was built")
        cfg = run.config
        data = load_dataset(cfg.dataset, cfg.data_root, **dict(cfg.dataset_options))
        labels = data.train_y.numpy()
        domains = data.train_domain.numpy() if data.train_domain is not None else None
        # the same call train() would make without a saved partition (train.client_partition)
        parts = client_partition(cfg, labels, None, domains)
        identity = run_partition_identity(cfg, fingerprint(data))
        pinned = dict(sm.params.data).get("fingerprint")
        if pinned and identity["data_fingerprint"] != pinned.strip().lower():
            raise RuntimeError(f"the {cfg.dataset} data loaded has content fingerprint {identity['data_fingerprint']}, "
                               f"but mirrors.{cfg.dataset}.fingerprint says {pinned}; it is other data")
        meta = {**spec, "num_train": int(len(labels)), "identity": identity}
        partition.save_partition(Path(sm.output.npz).parent, parts, labels, data.num_classes, meta)
        counts = partition.client_class_counts(labels, parts, data.num_classes)
        print(f"data fingerprint {identity['data_fingerprint']}")
        print(partition.format_count_table(counts))
    except BaseException:
        traceback.print_exc()
        raise SystemExit(f"partition failed: {sys.exc_info()[1]} (full log: {sm.log[0]})") from None
