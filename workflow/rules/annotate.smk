# Human evaluation, DSPO Fig. 3 (docs/annotation.md, "In the workflow"): per framework, the
# votes of a real compare round (config human_eval.votes, written by `annotate export`) or of
# simulated annotators following an evaluation metric (annotate_simulate, labelled SIMULATED),
# turned into win rates, Bradley-Terry scores and the bar plot (annotate_winrate) for the
# report. Thin rules: the logic is pipeline/annotate (python -m pipeline annotate ...).
from pipeline.annotate import human_eval

HUMAN_EVAL = human_eval.human_eval_settings(config)
SIMULATE = HUMAN_EVAL["simulate"]
HUMAN_EVAL_FOCUS = f"--focus {HUMAN_EVAL['focus']}" if HUMAN_EVAL["focus"] else ""
# per framework: the votes table (None: no human evaluation) and the report's input folder(s)
HUMAN_VOTES = {fw: human_eval.votes_table(config, fw) for fw in FRAMEWORKS}
HUMAN_WINRATES = {fw: human_eval.winrate_folders(config, fw) for fw in FRAMEWORKS}


rule annotate_simulate:
    input:
        evaluations=get_evaluations,
        testsets=[testset["path"] for testset in TESTSETS.values()],
    output:
        artifact("simulated_votes"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/annotate/simulate/{framework}.log",
    params:
        code=code_hash("annotate.cli"),
        config=json.dumps({"simulate": SIMULATE, "focus": HUMAN_EVAL["focus"]}, sort_keys=True),
        testsets=" ".join(f"--testset {name}={testset['path']}"
                          for name, testset in TESTSETS.items()),
        focus=HUMAN_EVAL_FOCUS,
        annotators=SIMULATE["annotators"],
        rounds=SIMULATE["rounds"],
        noise=SIMULATE["noise"],
        metric=SIMULATE["metric"],
        repeat_fraction=SIMULATE["repeat_fraction"],
        gold=SIMULATE["gold"],
        seed=config["seed"],
    shell:
        "python -m pipeline annotate simulate --framework {wildcards.framework} "
        "{params.testsets} {params.focus} --annotators {params.annotators} "
        "--rounds {params.rounds} --noise {params.noise} --metric {params.metric} "
        "--repeat-fraction {params.repeat_fraction} --gold {params.gold} "
        "--seed {params.seed} --out {output} > {log} 2>&1"


rule annotate_winrate:
    input:
        votes=lambda wildcards: HUMAN_VOTES[wildcards.framework] or [],
    output:
        directory(artifact("human_winrates")),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/annotate/winrate/{framework}.log",
    params:
        code=code_hash("annotate.cli"),
        config=json.dumps({k: HUMAN_EVAL[k] for k in ("focus", "reference", "bootstrap",
                                                      "bt_bootstrap")}, sort_keys=True),
        focus=HUMAN_EVAL_FOCUS,
        reference=HUMAN_EVAL["reference"],
        bootstrap=HUMAN_EVAL["bootstrap"],
        bt_bootstrap=HUMAN_EVAL["bt_bootstrap"],
        seed=config["seed"],
    shell:
        "python -m pipeline annotate winrate --votes {input.votes} --out-dir {output} "
        "{params.focus} --reference {params.reference} --bootstrap {params.bootstrap} "
        "--bt-bootstrap {params.bt_bootstrap} --seed {params.seed} > {log} 2>&1"
