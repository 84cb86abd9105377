rule train:
    input:
        star="results/{dataset}/preprocess/particles.star",
    output:
        # The final files, not the run folder: when a job fails (a scheduler kill, a timeout) Snakemake deletes
        # these before the retry but keeps the folder's checkpoint.pt, which --resume continues from.
        poses="results/{dataset}/train/poses.star",
        latents="results/{dataset}/train/latents.npy",
        weights="results/{dataset}/train/weights.pt",
    log:
        "logs/{dataset}/train.log",
    benchmark:
        "benchmarks/{dataset}/train.tsv"
    conda:
        "../../envs/cryofire.yaml"
    # Threads per training process: with `gpus: N` the job runs N processes (SLURM: cpus_per_gpu x N CPUs).
    threads: 8
    resources:
        mem_mb=32000,
        runtime=lambda wildcards, attempt: 480 * attempt,
        gpu=get_train_gpus,
    params:
        run=subpath(output.weights, parent=True),
        launcher=get_train_launcher,
        args=get_train_args,
    shell:
        # --resume continues from run/checkpoint.pt when there is one and starts afresh when there is none
        # (with several GPUs every process resumes from it; rank 0 alone writes the run folder).
        "{params.launcher} train {input.star} -o {params.run} --resume {params.args} > {log} 2>&1"
