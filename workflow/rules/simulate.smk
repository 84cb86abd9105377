rule simulate:
    output:
        star="results/{dataset}/simulate/particles.star",
        truth="results/{dataset}/simulate/truth.json",
    log:
        "logs/{dataset}/simulate.log",
    benchmark:
        "benchmarks/{dataset}/simulate.tsv"
    conda:
        "../../envs/cryofire.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        args=get_simulate_args,
        outdir=subpath(output.star, parent=True),
    shell:
        "cryofire simulate -o {params.outdir} {params.args} > {log} 2>&1"
