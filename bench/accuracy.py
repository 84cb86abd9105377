"""Ab initio accuracy benchmark (issue 3): simulate, train from random initialisation, infer held-out images, evaluate.

    python bench/accuracy.py --out /work/bench-data/acc32 --box 32 --n-train 10000 --n-heldout 2000 --epochs 12

Steps (all through the cryofire library, as the CLI would run them):
1. `cryofire simulate`: the built-in bimodal phantom, 50/50 states, SNR 0.1, defocus 1.0-2.5 µm, shifts of a few
   pixels, simulated at twice the training box and Fourier-cropped by `cryofire preprocess` (as real data would be).
2. The first `--n-train` particles train the model ab initio (`--poses abinit`; the true poses are never used for
   training, only to log the rotation error per epoch).
3. The last `--n-heldout` particles are encoded by `cryofire infer` with the trained model.
4. Metrics (`cryofire.evaluate`): median rotation error after global alignment (both hands), shift error, and the
   confusion of k-means (k = 2) labels of the latents against the true states, on the training and held-out sets
   (for a run taught by the "em" teacher also that of the classes it wrote, rlnClassNumber);
   the FSC of the two cluster-centre volumes (`cryofire analyze --k 2`, `cryofire volume --clusters`) against the
   true states they match, after moving them into the truth's frame; wall time and images/s of training.
Writes `<out>/accuracy.json` and prints a summary line for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

from cryofire.analysis.latents import analyze_run
from cryofire.analysis.volumes import VolumeRequest, write_volumes
from cryofire.device import keep_freed_memory
from cryofire.evaluate import PoseAlignment, confusion, pose_metrics, state_fsc_metrics
from cryofire.io import read_star, write_star
from cryofire.preprocess import PreprocessConfig, preprocess
from cryofire.simulate import SimulationConfig, simulate_dataset
from cryofire.train import TrainConfig, train
from cryofire.train.infer import infer


def prepare(out: Path, box: int, n_train: int, n_heldout: int, seed: int) -> tuple[Path, Path]:
    """Simulate at 2x box, preprocess to box, split into train / held-out star files."""
    if not (out / "prep" / "heldout.star").exists():
        config = SimulationConfig(n_images=n_train + n_heldout, box_size=2 * box, snr=0.1, defocus_min_um=1.0,
                                  defocus_max_um=2.5, shift_std_px=2.0 * 2, seed=seed)
        star = simulate_dataset(config, out / "sim")
        prepared = read_star(preprocess(star, out / "prep", PreprocessConfig(box_size=box)))
        write_star(out / "prep" / "train.star", prepared.iloc[:n_train])
        write_star(out / "prep" / "heldout.star", prepared.iloc[n_train:])
    return out / "prep" / "train.star", out / "prep" / "heldout.star"


def score(pred_star: Path, true_table, latents: np.ndarray, seed: int, run_classes: bool) -> dict:
    """Pose errors and the confusion of 2-means latent labels against the true states; with ``run_classes`` (an
    "em"-taught run, whose poses.star holds its own rlnClassNumber) also the confusion of those classes."""
    predicted = read_star(pred_star, allow_absolute_paths=True)
    metrics = pose_metrics(predicted, true_table)
    truth = true_table["rlnClassNumber"].to_numpy()
    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(latents)
    metrics["confusion_rate"] = confusion(labels, truth)["confusion_rate"]
    if run_classes:
        metrics["class_confusion_rate"] = confusion(predicted["rlnClassNumber"].to_numpy(), truth)["confusion_rate"]
    return metrics


def state_fsc(run: Path, sim: Path, true_table, pose: dict, seed: int) -> list[dict]:
    """FSC (0.5 and 0.143 resolutions, Å) of each k-means (k = 2) cluster-centre volume against its true state."""
    analysis = analyze_run(run, k=2, seed=seed)
    volumes = write_volumes(run, run / "volumes", VolumeRequest(clusters=True), analysis)
    labels = np.load(analysis / "labels.npy")
    matching = confusion(labels, true_table["rlnClassNumber"].to_numpy())["matching"]
    alignment = PoseAlignment(np.asarray(pose["global_rotation"]), pose["mirrored_hand"])
    states = state_fsc_metrics(str(volumes), str(sim / "truth.json"), matching, alignment)
    return [{k: m[k] for k in ("cluster", "true_class", "resolution_fsc0.5_angstrom", "resolution_fsc0.143_angstrom")}
            for m in states]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-heldout", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", type=json.loads, default={}, help="ModelConfig overrides as JSON")
    parser.add_argument("--train", type=json.loads, default={}, help="TrainConfig overrides as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the EM teacher's stages
    keep_freed_memory()  # as the `cryofire` command line does

    train_star, heldout_star = prepare(args.out, args.box, args.n_train, args.n_heldout, args.seed)
    config = TrainConfig(epochs=args.epochs, seed=args.seed, model=args.model, **args.train)
    started = time.time()
    run = train(train_star, args.out / "run", config, resume=(args.out / "run" / "checkpoint.pt").exists())
    train_seconds = time.time() - started
    started = time.time()
    inferred = infer(run, heldout_star, args.out / "heldout")
    infer_seconds = time.time() - started
    taught = config.taught_by_em

    result = {
        "box": args.box, "n_train": args.n_train, "n_heldout": args.n_heldout, "epochs": args.epochs,
        "model": args.model, "train_options": args.train,
        "train_wall_s": train_seconds, "train_images_per_s": args.epochs * args.n_train / train_seconds,
        "infer_wall_s": infer_seconds, "infer_images_per_s": args.n_heldout / infer_seconds,
        "train": score(run / "poses.star", read_star(train_star), np.load(run / "latents.npy"), args.seed, taught),
        "heldout": score(inferred / "poses.star", read_star(heldout_star), np.load(inferred / "latents.npy"),
                         args.seed, taught),
    }
    result["state_fsc"] = state_fsc(run, args.out / "sim", read_star(train_star), result["train"], args.seed)
    (args.out / "accuracy.json").write_text(json.dumps(result, indent=1))
    for split in ("train", "heldout"):
        m = result[split]
        print(f"{split}: rotation error median {m['rotation_error_median_deg']:.2f} deg, shift error median "
              f"{m['shift_error_median_px']:.2f} px, confusion {100 * m['confusion_rate']:.1f} %"
              + (f" (latents), {100 * m['class_confusion_rate']:.1f} % (rlnClassNumber)" if taught else ""))
    for m in result["state_fsc"]:
        print(f"state {m['true_class']} (cluster {m['cluster']}): FSC 0.5 at {m['resolution_fsc0.5_angstrom']:.1f} Å, "
              f"0.143 at {m['resolution_fsc0.143_angstrom']:.1f} Å")
    print(f"training {train_seconds / 60:.1f} min ({result['train_images_per_s']:.0f} images/s); "
          f"infer {result['infer_images_per_s']:.0f} images/s")


if __name__ == "__main__":
    main()
