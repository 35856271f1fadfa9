rule candidates:
    input:
        unpack(get_candidate_models),
        data=artifact("data", split="train"),
        prompts=artifact("prompts", split="train"),
    output:
        directory(artifact("candidates")),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/candidates/{framework}.log",
    benchmark:
        "benchmarks/candidates/{framework}.tsv"
    params:
        code=code_hash("candidates"),
        config=job_config("candidates", "framework"),
        config_file=job_config_file("candidates", "framework"),
        threads=STAGE_THREADS,
        models=get_candidate_model_args,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["candidates"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline candidates --framework {wildcards.framework} "
        "$(printf -- '--model %s ' {params.models}) --data {input.data} --prompts {input.prompts} "
        "--out {output} "
        "--config {params.config_file} --seed {params.seed} > {log} 2>&1"
