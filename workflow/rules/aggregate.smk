# Tables (fedhpro.aggregate) and figures (fedhpro.figures), one directory of each per experiment:
# results/tables/<experiment>/ and results/figures/<experiment>/ from that experiment's runs only.
# Two rules, so deleting the tables (or the figures) rebuilds only those. Each output is a
# directory(): Snakemake removes it before the job and marks it complete only when the job
# succeeded, so a partial set of tables never looks complete.


wildcard_constraints:
    experiment="|".join(re.escape(name) for name in RUNS_OF_EXPERIMENT) or "(?!)",


localrules:
    aggregate,
    figures,


rule aggregate:
    input:
        metrics=experiment_metrics,
    output:
        report(
            directory(f"{TABLES}/{{experiment}}"),
            patterns=["{name}.csv"],
            caption="../report/tables.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
    params:
        rule=config["reporting"]["rule"],
        last_k=config["reporting"]["last_k"],
        experiment=experiment_params,
    log:
        f"{LOGS}/aggregate/{{experiment}}.log",
    conda:
        "../envs/fedhpro.yaml"
    script:
        "../scripts/aggregate.py"


rule figures:
    input:
        metrics=experiment_metrics,
    output:
        report(
            directory(f"{FIGURES}/{{experiment}}"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
            subcategory="{experiment}",
        ),
    params:
        rule=config["reporting"]["rule"],
        last_k=config["reporting"]["last_k"],
        experiment=experiment_params,
    log:
        f"{LOGS}/figures/{{experiment}}.log",
    conda:
        "../envs/fedhpro.yaml"
    script:
        "../scripts/figures.py"


# README figures (DOCS_FIGURES, common.smk): the quick default copies them into docs/figures.
localrules:
    docs_figure,


rule docs_figure:
    input:
        lambda wildcards: f"{FIGURES}/{DOCS_FIGURES[wildcards.name][0]}",
    output:
        "docs/figures/{name}.png",
    wildcard_constraints:
        name="|".join(re.escape(name) for name in DOCS_FIGURES),
    params:
        file=lambda wildcards: DOCS_FIGURES[wildcards.name][1],
    log:
        f"{LOGS}/docs_figures/{{name}}.log",
    conda:
        "../envs/fedhpro.yaml"
    shell:
        "cp {input}/{params.file} {output} 2> {log}"
