rule analyze:
    input:
        latents="results/{dataset}/train/latents.npy",
        poses="results/{dataset}/train/poses.star",
    output:
        summary=report(
            "results/{dataset}/train/analysis/analysis.json",
            caption="../report/analysis.rst",
            category="{dataset}",
            subcategory="Latent space",
        ),
        labels="results/{dataset}/train/analysis/labels.npy",
        centers="results/{dataset}/train/analysis/centers.npy",
    log:
        "logs/{dataset}/analyze.log",
    benchmark:
        "benchmarks/{dataset}/analyze.tsv"
    conda:
        "../../envs/cryofire.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        run=subpath(input.latents, parent=True),
        outdir=subpath(output.summary, parent=True),
        args=get_analyze_args,
    shell:
        "cryofire analyze {params.run} -o {params.outdir} {params.args} > {log} 2>&1"


rule volumes:
    input:
        weights="results/{dataset}/train/weights.pt",
        latents="results/{dataset}/train/latents.npy",
        centers="results/{dataset}/train/analysis/centers.npy",
    output:
        index="results/{dataset}/train/volumes/volumes.json",
    log:
        "logs/{dataset}/volumes.log",
    benchmark:
        "benchmarks/{dataset}/volumes.tsv"
    conda:
        "../../envs/cryofire.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=lambda wildcards, attempt: 30 * attempt,
        gpu=1,
    params:
        run=subpath(input.weights, parent=True),
        analysis=subpath(input.centers, parent=True),
        outdir=subpath(output.index, parent=True),
        args=get_volume_args,
    shell:
        "cryofire volume {params.run} -o {params.outdir} --analysis {params.analysis} --clusters {params.args} "
        "> {log} 2>&1"
