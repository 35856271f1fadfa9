rule candidates:
    input:
        unpack(get_candidate_models),
        data="results/data/train",
    output:
        directory("results/candidates/{framework}"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/candidates/{framework}.log",
    benchmark:
        "benchmarks/candidates/{framework}.tsv"
    params:
        code=code_hash("candidates"),
        config=get_candidates_config,
        models=get_candidate_model_args,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["candidates"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {threads} -- "
        "python -m pipeline candidates --framework {wildcards.framework} "
        "$(printf -- '--model %s ' {params.models}) --data {input.data} --out {output} "
        "--config {params.config:q} --seed {params.seed} > {log} 2>&1"
