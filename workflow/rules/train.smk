# One training run per RunSpec. The output is metrics.parquet only: train() writes it atomically
# when the run ends, so a partial run never looks complete. checkpoint.pt lives in the same
# directory but is deliberately not an output: Snakemake does not delete it after a killed run,
# and train() resumes from it. The run's canonical config is a param, so changing a hyperparameter
# reruns exactly the runs whose config changed (Snakemake's params rerun trigger); it holds neither
# the data location nor the execution keys (client_store, diagnostics, diagnostics_every,
# checkpoint_every: they change no number), so switching those reruns nothing (docs/run-identity.md).


rule train:
    input:
        unpack(train_input),
    output:
        metrics=f"{RUN_DIR}/metrics.parquet",
    params:
        run_config=lambda wildcards: run_of(wildcards).config_json,
    log:
        f"{LOGS}/train/{RUN_ID}.log",
    threads: 1 if config["slurm"]["launcher"] == "submitit" else config["threads"]
    resources:
        **train_resources(),
    conda:
        "../envs/fedhpro.yaml"
    script:
        "../scripts/train.py"


localrules:
    main_runs,


rule main_runs:
    input:
        MAIN_METRICS,
