rule report:
    input:
        poses="results/{dataset}/train/poses.star",
        latents="results/{dataset}/train/latents.npy",
        weights="results/{dataset}/train/weights.pt",
        analysis="results/{dataset}/train/analysis/analysis.json",
        volumes="results/{dataset}/train/volumes/volumes.json",
        metrics=get_report_metrics,
    output:
        html=report(
            "results/{dataset}/report.html",
            caption="../report/dataset_report.rst",
            category="{dataset}",
            subcategory="Report",
        ),
        chimerax="results/{dataset}/report.cxc",
    log:
        "logs/{dataset}/report.log",
    benchmark:
        "benchmarks/{dataset}/report.tsv"
    conda:
        "../../envs/cryofire.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        run=subpath(input.weights, parent=True),
        analysis=subpath(input.analysis, parent=True),
        volumes=subpath(input.volumes, parent=True),
        metrics=get_metrics_arg,
    shell:
        "cryofire report {params.run} -o {output.html} --analysis {params.analysis} --volumes {params.volumes} "
        "{params.metrics} --title 'cryofire: {wildcards.dataset}' > {log} 2>&1"
