# Config validation and input functions; every rule's logic lives in the cryofire package.
import re
import shlex

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

DATASETS = config["datasets"]


wildcard_constraints:
    dataset="|".join(re.escape(name) for name in DATASETS) if DATASETS else "NO_DATASET",


def is_simulated(dataset):
    return "simulate" in DATASETS[dataset]


def get_options(dataset, step):
    """The options of `step` (preprocess, train, analyze, volumes) for a dataset: the top-level block overridden
    key by key by the dataset's own block; mappings inside it (train's `extra`) are merged key by key too.
    """
    options = {
        key: (dict(value) if isinstance(value, dict) else value)
        for key, value in config[step].items()
    }
    for key, value in DATASETS[dataset].get(step, {}).items():
        options[key] = (
            {**options.get(key, {}), **value} if isinstance(value, dict) else value
        )
    return options


def as_flags(options, negatable=False):
    """Command-line flags of an options mapping: `some_key: v` -> `--some-key v`; `true` -> `--some-key`;
    `false` -> `--no-some-key` if the command has such negations (`negatable`), else nothing.
    """
    flags = []
    for key, value in options.items():
        name = key.replace("_", "-")
        if value is True:
            flags.append(f"--{name}")
        elif value is False:
            if negatable:
                flags.append(f"--no-{name}")
        elif value is not None:
            flags.append(f"--{name} {shlex.quote(str(value))}")
    return " ".join(flags)


def get_raw_particles(wildcards):
    """The particle file a dataset starts from: simulated by the workflow, or the user's star/cs file."""
    if is_simulated(wildcards.dataset):
        return f"results/{wildcards.dataset}/simulate/particles.star"
    return DATASETS[wildcards.dataset]["particles"]


def get_datadir_arg(wildcards):
    datadir = DATASETS[wildcards.dataset].get("datadir")
    return f"--datadir {shlex.quote(datadir)}" if datadir else ""


def get_preprocess_args(wildcards):
    return as_flags(get_options(wildcards.dataset, "preprocess"))


def get_simulate_args(wildcards):
    options = DATASETS[wildcards.dataset]["simulate"]
    flags = {
        "n_images": "--n-images",
        "box": "--box",
        "pixel_size": "--pixel-size",
        "snr": "--snr",
        "shift_std": "--shift-std",
        "heterogeneity": "--heterogeneity",
        "seed": "--seed",
    }
    args = [f"{flag} {options[key]}" for key, flag in flags.items() if key in options]
    if "defocus_um" in options:
        args.append("--defocus {} {}".format(*options["defocus_um"]))
    if "state_weights" in options:
        weights = " ".join(str(w) for w in options["state_weights"])
        args.append(f"--state-weights {weights}")
    return " ".join(args)


def get_train_args(wildcards):
    """Every `cryofire train` option of the dataset: the named ones, then those of its `extra` map (`gpus` is
    the workflow's: see get_train_launcher).
    """
    options = get_options(wildcards.dataset, "train")
    extra = options.pop("extra", {})
    options.pop("gpus", None)
    return (
        f"{as_flags(options, negatable=True)} {as_flags(extra, negatable=True)}".strip()
    )


def get_train_gpus(wildcards):
    return get_options(wildcards.dataset, "train")["gpus"]


def get_train_launcher(wildcards, resources):
    """`cryofire` for one GPU; for several, torchrun with one process per GPU the job was given (a profile's
    `set-resources`, or a local `--resources gpu=N` smaller than the request, can change that number).
    """
    if resources.gpu <= 1:
        return "cryofire"
    return f"torchrun --standalone --nproc_per_node {resources.gpu} -m cryofire.cli"


def get_analyze_args(wildcards):
    return as_flags(get_options(wildcards.dataset, "analyze"))


def get_volume_args(wildcards):
    """Options of `cryofire volume` besides --clusters: the principal-component series (pc 0: none), box, hand."""
    options = get_options(wildcards.dataset, "volumes")
    if not options["pc"]:
        del options["pc"], options["steps"]
    return as_flags(options)


def get_true_average_volume(wildcards):
    return f"results/{wildcards.dataset}/simulate/volumes/average.mrc"


def get_report_metrics(wildcards):
    """The `cryofire evaluate` metrics shown in a dataset's report (simulated datasets only)."""
    if not is_simulated(wildcards.dataset):
        return []
    return [
        f"results/{wildcards.dataset}/evaluate/train_metrics.json",
        f"results/{wildcards.dataset}/evaluate/backproject_metrics.json",
    ]


def get_metrics_arg(wildcards, input):
    return f"--metrics {' '.join(input.metrics)}" if input.metrics else ""


def get_final_outputs():
    """Per dataset: the report (which pulls in training, analysis, volumes and, when simulated, the metrics) and
    the consensus backprojection from the particle file's poses, a sanity check of the data and its CTF.
    """
    outputs = []
    for dataset in DATASETS:
        outputs.append(f"results/{dataset}/report.html")
        outputs.append(f"results/{dataset}/backproject/consensus.mrc")
        if is_simulated(dataset):
            outputs.append(f"results/{dataset}/evaluate/backproject_metrics.json")
    return outputs
