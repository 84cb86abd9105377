# Simulated datasets only: comparisons with the ground truth that `cryofire simulate` wrote.


rule evaluate_backproject:
    input:
        volume="results/{dataset}/backproject/consensus.mrc",
        truth="results/{dataset}/simulate/truth.json",
    output:
        metrics=report(
            "results/{dataset}/evaluate/backproject_metrics.json",
            caption="../report/evaluate_backproject.rst",
            category="{dataset}",
            subcategory="Metrics vs ground truth",
        ),
    log:
        "logs/{dataset}/evaluate_backproject.log",
    benchmark:
        "benchmarks/{dataset}/evaluate_backproject.tsv"
    conda:
        "../../envs/cryofire.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        true_volume=get_true_average_volume,
    shell:
        "cryofire evaluate --volume {input.volume} --true-volume {params.true_volume} "
        "-o {output.metrics} > {log} 2>&1"


rule evaluate_train:
    input:
        # The preprocessed particle file still holds the simulated poses and states (rlnClassNumber).
        particles="results/{dataset}/preprocess/particles.star",
        poses="results/{dataset}/train/poses.star",
        labels="results/{dataset}/train/analysis/labels.npy",
        volumes="results/{dataset}/train/volumes/volumes.json",
        truth="results/{dataset}/simulate/truth.json",
    output:
        metrics=report(
            "results/{dataset}/evaluate/train_metrics.json",
            caption="../report/evaluate_train.rst",
            category="{dataset}",
            subcategory="Metrics vs ground truth",
        ),
    log:
        "logs/{dataset}/evaluate_train.log",
    benchmark:
        "benchmarks/{dataset}/evaluate_train.tsv"
    conda:
        "../../envs/cryofire.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "cryofire evaluate --true-star {input.particles} --pred-star {input.poses} --pred-labels {input.labels} "
        "--volumes-json {input.volumes} --truth-json {input.truth} -o {output.metrics} > {log} 2>&1"
