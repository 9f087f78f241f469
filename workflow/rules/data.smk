# Dataset downloads (only for datasets whose DatasetSpec lists files, e.g. CIFAR; digits is offline).
# Only the files the sweep's runs need are fetched (DOWNLOAD_FILES in common.smk: e.g. digit_domains
# with `domains: [mnist, usps]` fetches MNIST and USPS, not SVHN); files the loader already finds
# locally and that verify are not fetched again. `files` is a param, so a later sweep that needs more
# files reruns this rule (Snakemake's params rerun trigger); the marker is an ancient() input of the
# partitions and runs, so that rerun does not make them out of date.


localrules:
    download,


rule download:
    output:
        f"{DATA_ROOT}/{{dataset}}/download.complete",
    params:
        files=lambda wildcards: DOWNLOAD_FILES[wildcards.dataset],
        mirror=lambda wildcards: config["mirrors"].get(wildcards.dataset, {}),
        data_root=lambda wildcards, output: os.path.dirname(os.path.dirname(output[0])),
    log:
        f"{LOGS}/download/{{dataset}}.log",
    wildcard_constraints:
        dataset="|".join(re.escape(d) for d in DOWNLOAD_DATASETS) or "(?!)",
    conda:
        "../envs/fedhpro.yaml"
    script:
        "../scripts/download.py"
