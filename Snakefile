# DSPO: Direct Semantic Preference Optimization for real-world image super-resolution.
#
# Paths: results/<stage>/..., logs/<stage>/..., benchmarks/<stage>/...
# Run:   snakemake --cores all [--resources gpu=N] [--configfile workflow/presets/NAME.yaml]
from snakemake.utils import min_version

min_version("9.12")


# config.yaml is the demo; a preset given with --configfile replaces it (rather than being
# merged into it), so a paper run never inherits the demo's stand-ins.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    framework="|".join(FRAMEWORKS),
    method="|".join(METHODS),
    objective="|".join([*SELECT_OBJECTIVES, contracts.FRONT_OBJECTIVE]),
    testset="|".join(TESTSETS),


include: "workflow/rules/degrade.smk"
include: "workflow/rules/prompts.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/candidates.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/caption.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/rounds_inputs.smk"
include: "workflow/rules/rounds.smk"
include: "workflow/rules/winrates_inputs.smk"
include: "workflow/rules/winrates.smk"
include: "workflow/rules/annotate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/study.smk"


check_gpu_requests()


rule all:
    default_target: True
    input:
        get_final_outputs(),
