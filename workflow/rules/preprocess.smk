rule preprocess:
    input:
        particles=get_raw_particles,
    output:
        star="results/{dataset}/preprocess/particles.star",
    log:
        "logs/{dataset}/preprocess.log",
    benchmark:
        "benchmarks/{dataset}/preprocess.tsv"
    conda:
        "../../envs/cryofire.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    params:
        args=get_preprocess_args,
        datadir=get_datadir_arg,
        outdir=subpath(output.star, parent=True),
    shell:
        "cryofire preprocess {input.particles} -o {params.outdir} {params.datadir} {params.args} > {log} 2>&1"
