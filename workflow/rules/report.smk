# The reproduction report: every published number of the registry (config key `published`) beside ours,
# computed with the published number's own metric and rule (fedhpro.published), written to the path of
# config key `reproduction_report` (e.g. docs/reproduction.md). Only when both keys are set.
#
# Its inputs are every planned run's metrics, so the report is built once all runs finished; with
# `--config report_partial=True` it is built from the runs finished when the workflow is loaded (the report
# counts the runs each cell still misses), and a later invocation rebuilds it as more runs finish.


if config.get("published") and config.get("reproduction_report"):

    localrules:
        reproduction_report,

    rule reproduction_report:
        input:
            registry=config["published"],
            metrics=report_metrics,
        output:
            config["reproduction_report"],
        params:
            results=RESULTS,
            configs=lambda wildcards: [os.path.relpath(str(f)) for f in workflow.configfiles],
            planned=len(ALL_METRICS),
        log:
            f"{LOGS}/reproduction_report.log",
        conda:
            "../envs/fedhpro.yaml"
        script:
            "../scripts/report.py"
