# FedHPro reproduction: data -> partitions -> training runs (+ ablations) -> tables and figures.
#
#   snakemake --cores 2                                  # quick default (config/config.yaml, digits, offline)
#   snakemake --cores 2 --configfile config/paper.yaml   # the paper's grid
#   snakemake --profile profiles/slurm                   # training runs as SLURM jobs (submitit)
#   snakemake --report report.html                       # tables, figures and partition histograms
#
# Layout follows snakemake-workflows/rna-seq-star-deseq2: rules in workflow/rules, thin scripts in
# workflow/scripts calling the fedhpro package, the config schema in workflow/schemas.
from snakemake.utils import min_version

min_version("9.0")


# --configfile FILE replaces the quick default instead of being merged into it (Snakemake would
# otherwise deep-merge the two, mixing e.g. the methods of both files)
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/partition.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/ablation.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
