rule backproject:
    input:
        star="results/{dataset}/preprocess/particles.star",
    output:
        volume="results/{dataset}/backproject/consensus.mrc",
        fsc="results/{dataset}/backproject/consensus_fsc.json",
    log:
        "logs/{dataset}/backproject.log",
    benchmark:
        "benchmarks/{dataset}/backproject.tsv"
    conda:
        "../../envs/cryofire.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0,
    shell:
        "cryofire backproject {input.star} -o {output.volume} --fsc {output.fsc} > {log} 2>&1"


rule evaluate_backproject:
    input:
        volume="results/{dataset}/backproject/consensus.mrc",
        truth="results/{dataset}/simulate/truth.json",
    output:
        metrics="results/{dataset}/evaluate/backproject_metrics.json",
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
