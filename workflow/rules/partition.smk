# One client split per (dataset, scheme, alpha / classes per client, rho, clients, partition seed).
# Its params are what the split is, never where the data lives: the split's keys and the data's declared
# identity (the checksums its downloads are verified against, a pinned content fingerprint, and for data
# given by dataset_options.path the content fingerprint of what is there). Moving the data (data_root,
# dataset_options.path) reruns nothing; declaring other data, or putting other data under the same path,
# reruns the partitions and, through them, the runs (partition_data_identity in common.smk). The job
# records the data's content fingerprint in meta.json; runs check it.


localrules:
    partition,


rule partition:
    input:
        data=lambda wildcards: download_marker(wildcards.dataset),
    output:
        npz=f"{PARTITION_DIR}/partition.npz",
        counts=f"{PARTITION_DIR}/counts.csv",
        class_counts=f"{PARTITION_DIR}/class_counts.csv",
        histogram=report(
            f"{PARTITION_DIR}/histogram.png",
            caption="../report/partition.rst",
            category="Partitions",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "split": "{het}", "partition seed": "{pseed}"},
        ),
        meta=f"{PARTITION_DIR}/meta.json",
    params:
        spec=lambda wildcards: partition_of(wildcards).params(),
        data=partition_data_identity,
    log:
        f"{LOGS}/partition/{PARTITION_ID}.log",
    conda:
        "../envs/fedhpro.yaml"
    script:
        "../scripts/partition.py"
