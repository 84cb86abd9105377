"""Round trip simulate -> backproject with the true poses, through our star file and through one written by cryoDRGN.

1. `cryofire simulate` (box 64, 5,000 images, SNR 100 by default) and `cryofire backproject` of its star file;
   `cryofire evaluate` gives the FSC of the map against the true population-average volume. Target: FSC >= 0.5
   out to 0.5 / 1.2 cycles/px (the FSC=0.5 resolution within 1.2x Nyquist). The half-map FSC is recorded too.
2. The same images and true poses/CTF in a RELION 3.1 star file written by another program: cryoDRGN's
   `cryodrgn_utils write_star <stack.mrcs> --ctf ctf.pkl --poses pose.pkl`, from pose.pkl/ctf.pkl converted here
   from our truth in cryoDRGN's conventions (R = RELION's Euler matrix, translation = origin in pixels / D,
   ctf.pkl columns D, Apix, dfU, dfV, dfang, kV, Cs, w, phase). These are also compared with what cryoDRGN's
   own `parse_pose_star` / `parse_ctf_star` read from our star file. The cryoDRGN star is then backprojected
   with cryofire and must give the same map and FSC.

    .venv/bin/python bench/roundtrip.py --workdir /work/bench-data/roundtrip \\
        --cryodrgn-venv /work/bench-data/venv-cryodrgn

cryoDRGN lives in its own venv (python3 -m venv DIR; DIR/bin/pip install torch==2.13.0 cryodrgn). Prints a JSON
summary and writes it to <workdir>/summary.json.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryofire import physics
from cryofire.io import read_star, read_volume

BIN = Path(sys.executable).parent
NYQUIST_FACTOR = 1.2


def run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}); see {log}")
    return time.perf_counter() - start


def backproject_and_evaluate(star: Path, out: Path, true_volume: Path, logs: Path, extra: list[str]) -> dict:
    wall = run([str(BIN / "cryofire"), "backproject", str(star), "-o", str(out), *extra], logs / f"{out.stem}_bp.log")
    metrics_path = out.with_suffix(".vs_truth.json")
    run([str(BIN / "cryofire"), "evaluate", "--volume", str(out), "--true-volume", str(true_volume),
         "-o", str(metrics_path)], logs / f"{out.stem}_eval.log")
    truth = json.loads(metrics_path.read_text())["fsc"]
    halves = json.loads(Path(f"{out}.fsc.json").read_text())
    frequency_px = np.asarray(truth["frequency_per_angstrom"]) * truth["nyquist_angstrom"] / 2
    return {
        "backproject_wall_s": wall,
        "vs_truth_fsc0.5_angstrom": truth["resolution_fsc0.5_angstrom"],
        "vs_truth_fsc0.143_angstrom": truth["resolution_fsc0.143_angstrom"],
        "half_map_fsc0.5_angstrom": halves["resolution_fsc0.5_angstrom"],
        "half_map_fsc0.143_angstrom": halves["resolution_fsc0.143_angstrom"],
        "nyquist_angstrom": truth["nyquist_angstrom"],
        "vs_truth_fsc0.5_cycles_per_px": truth["nyquist_angstrom"] / 2 / truth["resolution_fsc0.5_angstrom"],
        "frequency_cycles_per_px": frequency_px.tolist(),
        "vs_truth_fsc": truth["fsc"],
        "half_map_fsc": halves["fsc"],
    }


def cryodrgn_inputs(star: Path) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """(R (N, 3, 3), translation (N, 2) as a fraction of the box) and ctf (N, 9) from our true star file."""
    table = read_star(star)
    angles = [torch.tensor(table[c].to_numpy(np.float64)) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    rotations = physics.euler_to_matrix(*angles).numpy()
    size = table["rlnImageSize"].to_numpy(np.float64)
    pixel = table["rlnImagePixelSize"].to_numpy(np.float64)
    origin_px = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64) / pixel[:, None]
    ctf = np.stack([size, pixel, table["rlnDefocusU"], table["rlnDefocusV"], table["rlnDefocusAngle"],
                    table["rlnVoltage"], table["rlnSphericalAberration"], table["rlnAmplitudeContrast"],
                    table["rlnPhaseShift"]], axis=1).astype(np.float32)
    return (rotations, origin_px / size[:, None]), ctf


def compare_star_tables(ours: Path, theirs: Path) -> dict:
    """Differences of the tables cryofire reads from the two star files (poses as rotation angles)."""
    a, b = read_star(ours), read_star(theirs, allow_absolute_paths=True)
    rot = lambda t: physics.euler_to_matrix(  # noqa: E731
        *(torch.tensor(t[c].to_numpy(np.float64)) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    angle_deg = physics.geodesic_distance_deg(rot(a), rot(b)).numpy()
    diffs = {"n_rows": [len(a), len(b)], "max_rotation_difference_deg": float(np.nanmax(angle_deg))}
    for column in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                   "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                   "rlnImageSize", "image_index"):
        diffs[f"max_abs_diff_{column}"] = float(np.abs(a[column].to_numpy(float) - b[column].to_numpy(float)).max())
    diffs["same_stack_files"] = bool((a["image_path"].map(lambda p: Path(p).resolve())
                                      == b["image_path"].map(lambda p: Path(p).resolve())).all())
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-data/roundtrip"))
    parser.add_argument("--cryodrgn-venv", type=Path, default=Path("/work/bench-data/venv-cryodrgn"))
    parser.add_argument("-n", "--n-images", type=int, default=5000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--reuse-sim", action="store_true")
    args = parser.parse_args()

    work = args.workdir
    sim, bp, drgn, logs = work / "sim", work / "bp", work / "cryodrgn", work / "logs"
    for folder in (bp, drgn, logs):
        folder.mkdir(parents=True, exist_ok=True)
    summary: dict = {"n_images": args.n_images, "box": args.box, "snr": args.snr}
    if not (args.reuse_sim and (sim / "particles.star").exists()):
        shutil.rmtree(sim, ignore_errors=True)
        summary["simulate_wall_s"] = run([str(BIN / "cryofire"), "simulate", "-o", str(sim), "-n", str(args.n_images),
                                          "--box", str(args.box), "--snr", str(args.snr)], logs / "simulate.log")
    star, true_volume = sim / "particles.star", sim / "volumes" / "average.mrc"
    ours = backproject_and_evaluate(star, bp / "ours.mrc", true_volume, logs, [])
    limit = 0.5 / NYQUIST_FACTOR
    ours["target_fsc0.5_beyond_cycles_per_px"] = limit
    ours["meets_target"] = bool(ours["vs_truth_fsc0.5_cycles_per_px"] >= limit)
    summary["cryofire_star"] = ours

    drgn_bin = args.cryodrgn_venv / "bin"
    if not (drgn_bin / "cryodrgn_utils").exists():
        summary["cryodrgn"] = f"skipped: no cryoDRGN in {args.cryodrgn_venv}"
        print(json.dumps(summary, indent=1))
        return
    version = subprocess.run([str(drgn_bin / "python"), "-c", "import cryodrgn; print(cryodrgn.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    poses, ctf = cryodrgn_inputs(star)
    with open(drgn / "pose.pkl", "wb") as f:
        pickle.dump(poses, f)
    with open(drgn / "ctf.pkl", "wb") as f:
        pickle.dump(ctf, f)
    # cryoDRGN's own reading of our star file, to check the conversion above against its conventions.
    run([str(drgn_bin / "cryodrgn"), "parse_pose_star", str(star), "-o", str(drgn / "pose_parsed.pkl")],
        logs / "parse_pose_star.log")
    run([str(drgn_bin / "cryodrgn"), "parse_ctf_star", str(star), "-o", str(drgn / "ctf_parsed.pkl")],
        logs / "parse_ctf_star.log")
    with open(drgn / "pose_parsed.pkl", "rb") as f:
        parsed_poses = pickle.load(f)
    with open(drgn / "ctf_parsed.pkl", "rb") as f:
        parsed_ctf = pickle.load(f)
    stacks = sorted({Path(p) for p in read_star(star)["image_path"]})
    if len(stacks) != 1:
        raise SystemExit("expected one stack (use at most 10,000 images)")
    drgn_star = drgn / "particles_cryodrgn.star"
    run([str(drgn_bin / "cryodrgn_utils"), "write_star", str(stacks[0]), "--ctf", str(drgn / "ctf.pkl"),
         "--poses", str(drgn / "pose.pkl"), "-o", str(drgn_star), "--full-path"], logs / "write_star.log")
    theirs = backproject_and_evaluate(drgn_star, bp / "cryodrgn.mrc", true_volume, logs, ["--allow-absolute-paths"])
    ours_map, _ = read_volume(bp / "ours.mrc")
    their_map, _ = read_volume(bp / "cryodrgn.mrc")
    _, map_fsc = physics.fourier_shell_correlation(torch.from_numpy(ours_map).double(),
                                                   torch.from_numpy(their_map).double())
    summary["cryodrgn"] = {
        "version": version,
        "our_conversion_vs_parse_pose_star": {
            "max_abs_diff_R": float(np.abs(parsed_poses[0] - poses[0]).max()),
            "max_abs_diff_translation_fraction": float(np.abs(parsed_poses[1] - poses[1]).max()),
        },
        "our_conversion_vs_parse_ctf_star_max_abs_diff_per_column": np.abs(parsed_ctf - ctf).max(axis=0).tolist(),
        "star_written_by_cryodrgn": str(drgn_star),
        "star_header_lines": [line for line in drgn_star.read_text().splitlines()[:40] if line.startswith("_")],
        "tables_read_by_cryofire_differences": compare_star_tables(star, drgn_star),
        "backprojection": theirs,
        "max_abs_fsc_difference_vs_truth": float(np.abs(np.subtract(theirs["vs_truth_fsc"], ours["vs_truth_fsc"])).max()),
        "max_abs_half_map_fsc_difference": float(np.abs(np.subtract(theirs["half_map_fsc"], ours["half_map_fsc"])).max()),
        "map_difference_max_abs_over_max": float(np.abs(ours_map - their_map).max() / np.abs(ours_map).max()),
        "fsc_between_the_two_maps_min": float(map_fsc.min()),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
