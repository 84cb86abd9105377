# Config validation and input functions; every rule's logic lives in the cryofire package.
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

DATASETS = config["datasets"]


wildcard_constraints:
    dataset="|".join(DATASETS) if DATASETS else "NO_DATASET",


def is_simulated(dataset):
    return "simulate" in DATASETS[dataset]


def get_raw_particles(wildcards):
    """The particle file a dataset starts from: simulated by the workflow, or the user's star/cs file."""
    if is_simulated(wildcards.dataset):
        return f"results/{wildcards.dataset}/simulate/particles.star"
    return DATASETS[wildcards.dataset]["particles"]


def get_datadir_arg(wildcards):
    datadir = DATASETS[wildcards.dataset].get("datadir")
    return f"--datadir {datadir}" if datadir else ""


def get_preprocess_args(wildcards):
    options = {**config["preprocess"], **DATASETS[wildcards.dataset].get("preprocess", {})}
    args = [f"--normalize {options['normalize']}", f"--mask-radius {options['mask_radius']}"]
    if options.get("box"):
        args.append(f"--box {options['box']}")
    if options["invert"]:
        args.append("--invert")
    return " ".join(args)


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
        args.append("--state-weights " + " ".join(str(w) for w in options["state_weights"]))
    return " ".join(args)


def get_true_average_volume(wildcards):
    return f"results/{wildcards.dataset}/simulate/volumes/average.mrc"


def get_final_outputs():
    outputs = []
    for dataset in DATASETS:
        outputs.append(f"results/{dataset}/backproject/consensus.mrc")
        if is_simulated(dataset):
            outputs.append(f"results/{dataset}/evaluate/backproject_metrics.json")
    return outputs
