"""The `cryofire` command line: one subcommand per pipeline step, each a thin wrapper over one library call.

Every option's help gives its unit. User-fixable problems (bad files, bad options) end with a one-line
`cryofire: error: ...` message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cryofire import __version__
from cryofire.device import keep_freed_memory
from cryofire.errors import CryofireError

_COMMANDS: dict[str, tuple] = {}


def command(name: str, help_text: str):
    """Register `add_arguments` as the parser of subcommand `name`; the decorated function runs it."""

    def register(add_arguments):
        def wrap(run):
            _COMMANDS[name] = (help_text, add_arguments, run)
            return run

        return wrap

    return register


def _add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="particle file: RELION .star (3.0, 3.1+) or cryoSPARC .cs")
    parser.add_argument("--datadir", help="folder the image paths are relative to (default: the particle file's folder)")
    parser.add_argument(
        "--allow-absolute-paths", action="store_true",
        help="allow image paths outside the data folder (absolute or with '..'); off by default for safety",
    )


def _write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


# --- simulate -------------------------------------------------------------------------------------------------------
def _simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("-n", "--n-images", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--box", type=int, default=64, help="box size D in pixels, even (default 64)")
    p.add_argument("--pixel-size", type=float, help="pixel size in Å (default: 160 Å / box)")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio, variance ratio over the box (default 0.1)")
    p.add_argument("--defocus", type=float, nargs=2, default=[1.0, 2.5], metavar=("MIN", "MAX"),
                   help="defocus range in µm, drawn uniformly (default 1.0 2.5)")
    p.add_argument("--astigmatism", type=float, default=200.0, help="maximum |defocusU - defocusV| in Å (default 200)")
    p.add_argument("--voltage", type=float, default=300.0, help="acceleration voltage in kV (default 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration in mm (default 2.7)")
    p.add_argument("--amplitude-contrast", type=float, default=0.1, help="amplitude contrast fraction (default 0.1)")
    p.add_argument("--shift-std", type=float, default=2.0, help="std of the particle offsets in pixels, per axis (default 2)")
    p.add_argument("--heterogeneity", choices=["bimodal", "continuous"], default="bimodal",
                   help="phantom: two discrete hinge states, or a uniform distribution of hinge angles")
    p.add_argument("--state-weights", type=float, nargs="+", default=[0.5, 0.5],
                   help="relative population of each discrete state (default 0.5 0.5)")
    p.add_argument("--hinge-range", type=float, nargs=2, default=[0.0, 35.0], metavar=("FROM", "TO"),
                   help="hinge angles in degrees: the two states, or the continuous range (default 0 35)")
    p.add_argument("--atom-sigma", type=float, help="pseudo-atom Gaussian width in Å (default max(2 Å, 1 pixel))")
    p.add_argument("--volume", action="append", default=[],
                   help=".mrc volume of one discrete state instead of the phantom (repeat for several states)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--images-per-stack", type=int, default=10_000, help="images per .mrcs file (default 10000)")


@command("simulate", "simulate a dataset with ground truth (built-in hinged phantom or .mrc volumes)")(_simulate_args)
def _simulate(args: argparse.Namespace) -> None:
    from cryofire.simulate import SimulationConfig, simulate_dataset

    config = SimulationConfig(
        n_images=args.n_images, box_size=args.box, pixel_size_angstrom=args.pixel_size, snr=args.snr,
        defocus_min_um=args.defocus[0], defocus_max_um=args.defocus[1], astigmatism_angstrom=args.astigmatism,
        voltage_kv=args.voltage, cs_mm=args.cs, amplitude_contrast=args.amplitude_contrast,
        shift_std_px=args.shift_std, heterogeneity=args.heterogeneity, state_weights=args.state_weights,
        hinge_range_deg=tuple(args.hinge_range), atom_sigma_angstrom=args.atom_sigma, volumes=args.volume,
        seed=args.seed, images_per_stack=args.images_per_stack,
    )
    print(simulate_dataset(config, args.out))


# --- preprocess -----------------------------------------------------------------------------------------------------
def _preprocess_args(p: argparse.ArgumentParser) -> None:
    _add_input_args(p)
    p.add_argument("-o", "--out", required=True, help="output folder (particles.star + stacks/)")
    p.add_argument("--box", type=int, help="output box size in pixels, even; Fourier cropping (default: keep)")
    p.add_argument("--normalize", choices=["background", "dataset", "none"], default="background",
                   help="background: per image, by mean/std outside the particle circle; dataset: one mean/std")
    p.add_argument("--mask-radius", type=float, default=0.85,
                   help="particle circle radius as a fraction of half the box, for background statistics (default 0.85)")
    p.add_argument("--invert", action="store_true", help="invert contrast (for dark particles on a bright background)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images with NaN/infinite pixels or (background normalisation) a constant background, "
                        "instead of stopping; costs one extra reading pass")
    p.add_argument("--chunk-size", type=int, default=1000, help="images processed at a time (bounds memory)")
    p.add_argument("--images-per-stack", type=int, default=50_000, help="images per output .mrcs (default 50000)")


@command("preprocess", "downsample (Fourier crop), normalise and optionally invert a particle stack")(_preprocess_args)
def _preprocess(args: argparse.Namespace) -> None:
    from cryofire.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(
        box_size=args.box, normalize=args.normalize, mask_radius_fraction=args.mask_radius, invert=args.invert,
        skip_bad_images=args.skip_bad_images, images_per_stack=args.images_per_stack, chunk_size=args.chunk_size,
    )
    print(preprocess(args.particles, args.out, config, args.datadir, args.allow_absolute_paths))


# --- backproject ----------------------------------------------------------------------------------------------------
def _backproject_args(p: argparse.ArgumentParser) -> None:
    _add_input_args(p)
    p.add_argument("-o", "--out", required=True, help="output volume (.mrc)")
    p.add_argument("--fsc", help="write the half-map FSC as JSON here (default: <out>.fsc.json)")
    p.add_argument("--max-images", type=int, help="use only the first N images")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu' or 'cuda[:N]'")


@command("backproject", "homogeneous reconstruction from the poses in a star/cs file, with half-map FSC")(_backproject_args)
def _backproject(args: argparse.Namespace) -> None:
    from cryofire.reconstruct import backproject_dataset

    result = backproject_dataset(
        args.particles, args.out, datadir=args.datadir, allow_absolute_paths=args.allow_absolute_paths,
        max_images=args.max_images, batch_size=args.batch_size, device=args.device,
    )
    _write_json(args.fsc or f"{args.out}.fsc.json", result)
    print(f"{args.out}: half-map FSC=0.5 at {result['resolution_fsc0.5_angstrom']:.2f} Å, "
          f"FSC=0.143 at {result['resolution_fsc0.143_angstrom']:.2f} Å")


# --- evaluate -------------------------------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--true-star", help="star file with the true poses (e.g. from cryofire simulate)")
    p.add_argument("--pred-star", help="star file with the predicted poses, same particles in the same order")
    p.add_argument("--true-labels", help=".npy of true classes (default: rlnClassNumber of --true-star)")
    p.add_argument("--pred-labels", help=".npy of predicted classes, one per particle")
    p.add_argument("--volume", help="reconstructed .mrc to compare with --true-volume by FSC")
    p.add_argument("--true-volume", help="reference .mrc, same box and frame")
    p.add_argument("--volumes-json", help="volumes.json of `cryofire volume --clusters`: FSC of each cluster map "
                   "against the true state it matches (needs --pred-labels and --truth-json)")
    p.add_argument("--truth-json", help="truth.json of `cryofire simulate` (names the true state maps)")
    p.add_argument("-o", "--out", required=True, help="metrics JSON")


@command("evaluate", "metrics against ground truth: rotation/shift error, FSC, class confusion")(_evaluate_args)
def _evaluate(args: argparse.Namespace) -> None:
    from cryofire.evaluate import evaluate_files

    metrics = evaluate_files(
        true_star=args.true_star, pred_star=args.pred_star, true_labels=args.true_labels,
        pred_labels=args.pred_labels, volume=args.volume, true_volume=args.true_volume,
        volumes_json=args.volumes_json, truth_json=args.truth_json,
    )
    _write_json(args.out, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=1))


# --- train / infer --------------------------------------------------------------------------------------------------
_TRAIN_EPILOG = """\
several GPUs (data-parallel, one process per GPU, on one node):
  torchrun --standalone --nproc_per_node N -m cryofire.cli train PARTICLES -o RUN [options]
  (or: torchrun --standalone --nproc_per_node N --no-python cryofire train ...)
  --batch-size is per process: each step averages N x batch-size images; rank 0 writes the run folder.
  Without CUDA (or with --device cpu) the processes share the CPU through gloo: meant for testing.
"""


def _train_args(p: argparse.ArgumentParser) -> None:
    from cryofire.model import ModelConfig
    from cryofire.options import add_dataclass_arguments
    from cryofire.train.config import DERIVED_MODEL_OPTIONS, TrainConfig

    p.epilog, p.formatter_class = _TRAIN_EPILOG, argparse.RawDescriptionHelpFormatter
    p.add_argument("particles", help="preprocessed particle file (.star or .cs)")
    p.add_argument("-o", "--out", required=True, help="run folder (config.yaml, checkpoint.pt, log.jsonl, outputs)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_dataclass_arguments(p.add_argument_group("training options"), TrainConfig, skip=("model",))
    add_dataclass_arguments(p.add_argument_group("model options"), ModelConfig, skip=DERIVED_MODEL_OPTIONS)


@command("train", "train the amortized model (encoder + hypervolume) on a preprocessed dataset")(_train_args)
def _train(args: argparse.Namespace) -> None:
    from cryofire.model import ModelConfig
    from cryofire.options import dataclass_values
    from cryofire.train import TrainConfig, train
    from cryofire.train.config import DERIVED_MODEL_OPTIONS
    from cryofire.train.distributed import launch_from_env

    values = dataclass_values(args, TrainConfig, skip=("model",))
    values["model"] = dataclass_values(args, ModelConfig, skip=DERIVED_MODEL_OPTIONS)
    run = train(args.particles, args.out, TrainConfig(**values), resume=args.resume)
    if launch_from_env().is_main:  # under torchrun, one line for the whole run
        print(run)


def _infer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of `cryofire train` (its weights.pt is used)")
    p.add_argument("particles", help="particle file of the images to encode (.star or .cs), preprocessed like the training set")
    p.add_argument("-o", "--out", required=True, help="output folder (poses.star, latents.npy)")
    p.add_argument("--datadir", help="folder the image paths are relative to")
    p.add_argument("--allow-absolute-paths", action="store_true", help="allow image paths outside the data folder")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu' or 'cuda[:N]'")


@command("infer", "predict poses and latents of new images with a trained encoder (no training)")(_infer_args)
def _infer(args: argparse.Namespace) -> None:
    from cryofire.train.infer import infer

    print(infer(args.run, args.particles, args.out, datadir=args.datadir,
                allow_absolute_paths=args.allow_absolute_paths, batch_size=args.batch_size, device=args.device))


# --- analyze / volume -----------------------------------------------------------------------------------------------
def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of `cryofire train` (its latents.npy and poses.star are used)")
    p.add_argument("-o", "--out", help="output folder (default: <run>/analysis)")
    p.add_argument("--k", type=int, help="k-means clusters (default: the number of states the Gaussian mixture's "
                   "BIC chooses)")
    p.add_argument("--max-states", type=int, default=8, help="largest Gaussian mixture tried (default 8)")
    p.add_argument("--max-embedding-points", type=int, default=20_000,
                   help="t-SNE on at most this many particles, a seeded random subset (default 20000; "
                        "UMAP, when installed, embeds all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


@command("analyze", "latent space of a run: PCA, 2D embedding, k-means, Gaussian mixture (BIC), per-cluster "
                    "star files")(_analyze_args)
def _analyze(args: argparse.Namespace) -> None:
    from cryofire.analysis import analyze_run

    print(analyze_run(args.run, args.out, k=args.k, max_states=args.max_states, seed=args.seed,
                      max_embedding_points=args.max_embedding_points))


def _volume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of `cryofire train` (its weights.pt is used)")
    p.add_argument("-o", "--out", required=True, help="output folder (.mrc files and volumes.json)")
    p.add_argument("--z", type=float, nargs="+", action="append", default=[], metavar="Z",
                   help="a latent to render, zdim values (repeat --z for several)")
    p.add_argument("--clusters", action="store_true",
                   help="render the particle nearest each k-means centre (centers.npy of `cryofire analyze`)")
    p.add_argument("--pc", type=int, help="render a series along this principal component (1-based)")
    p.add_argument("--steps", type=int, default=10,
                   help="volumes along --pc, 5th to 95th percentile of the particles (default 10)")
    p.add_argument("--analysis", help="folder of `cryofire analyze` (default: <run>/analysis)")
    p.add_argument("--box", type=int, help="output box S in px, even (default: the training box D); voxel size = "
                   "training pixel size x D / S; frequencies beyond the training Nyquist are zero, so a larger "
                   "box adds no detail")
    p.add_argument("--flip-hand", action="store_true", help="mirror the volumes along z (invert the handedness)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu' or 'cuda[:N]'")


@command("volume", "render volumes from a trained decoder: given latents, cluster centres, a PC "
                   "trajectory")(_volume_args)
def _volume(args: argparse.Namespace) -> None:
    from cryofire.analysis.volumes import VolumeRequest, write_volumes

    request = VolumeRequest(latents=args.z, clusters=args.clusters, pc=args.pc, steps=args.steps,
                            box_size=args.box, flip_hand=args.flip_hand)
    print(write_volumes(args.run, args.out, request, analysis_dir=args.analysis, device=args.device))


# --- report ---------------------------------------------------------------------------------------------------------
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of `cryofire train` (config.yaml, log.jsonl, poses.star, latents.npy)")
    p.add_argument("-o", "--out", required=True,
                   help="report page (.html); a ChimeraX script of the same name (.cxc) is written beside it")
    p.add_argument("--analysis", help="folder of `cryofire analyze` (default: <run>/analysis)")
    p.add_argument("--volumes", nargs="+", default=[], metavar="DIR",
                   help="output folders of `cryofire volume` (default: <run>/volumes and its subfolders holding a "
                        "volumes.json)")
    p.add_argument("--metrics", nargs="+", default=[], metavar="JSON",
                   help="metrics files of `cryofire evaluate` to show (simulated data)")
    p.add_argument("--preprocess-star",
                   help="the particle file given to `cryofire preprocess` (default: the one its stacks record)")
    p.add_argument("--title", help="page title (default: from the run folder's name)")


@command("report", "one self-contained HTML report of a run, and a ChimeraX script for its volumes")(_report_args)
def _report(args: argparse.Namespace) -> None:
    from cryofire.report import write_report

    page, script = write_report(args.run, args.out, analysis_dir=args.analysis, volume_dirs=args.volumes,
                                metrics=args.metrics, preprocess_star=args.preprocess_star, title=args.title)
    print(page)
    print(script)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cryofire", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cryofire {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cryofire` console script."""
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    try:
        _COMMANDS[args.command][2](args)
    except CryofireError as error:
        print(f"cryofire: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
