# DSPO: Direct Semantic Preference Optimization for real-world image super-resolution.
#
# Paths: results/<stage>/..., logs/<stage>/..., benchmarks/<stage>/...
# Run:   snakemake --cores all [--resources gpu=N] [--configfile workflow/presets/NAME.yaml]
from snakemake.utils import min_version

min_version("9.12")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/degrade.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
