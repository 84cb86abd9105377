rule backproject:
    input:
        star="results/{dataset}/preprocess/particles.star",
    output:
        volume="results/{dataset}/backproject/consensus.mrc",
        fsc=report(
            "results/{dataset}/backproject/consensus_fsc.json",
            caption="../report/consensus_fsc.rst",
            category="{dataset}",
            subcategory="Consensus (input poses)",
        ),
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
