"""Backprojection speed: `cryofire backproject` with the physics Backprojector.insert (index_put_) used before versus
cryofire.reconstruct.FastInserter (Friedel half plane, flat offsets, scatter_add_), same images, same process.

    .venv/bin/python bench/backproject_speed.py --star /work/bench-data/roundtrip/sim/particles.star -n 1024 \
        --before-commit be0a071

Runs `backproject_dataset` (the function behind `cryofire backproject`: read, re-centre, CTF, insert both
half-maps, reconstruct, FSC) once with each insertion, timing the whole call (wall and CPU) and the insertion
alone, and checks that the two reconstructions agree. With --before-commit C, also times `backproject_dataset`
as committed in C (the code before, as a whole, float32 CTF included). On a shared machine compare CPU times.
Without --star, simulates 2,000 images at D=64 under --workdir first. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import cryofire.reconstruct as reconstruct
from cryofire import physics
from cryofire.io import read_volume

BIN = Path(sys.executable).parent


class PhysicsInserter:
    """The insertion `cryofire backproject` used before: physics.Backprojector.insert, batch by batch."""

    def __init__(self, backprojector) -> None:
        self.backprojector = backprojector

    def ctf_at_pixels(self, **ctf_args):
        """The CTF on the whole padded lattice (in float64 like the new code, so that the maps can be compared;
        the code before computed it in float32, with a 0.5% wavelength error, at about half the cost)."""
        size = self.backprojector.padded_size
        return physics.ctf_for_images(size, dtype=torch.float64, **ctf_args).float()

    def insert(self, images, rotations, ctf) -> None:
        self.backprojector.insert(images, rotations, ctf)

    def flush(self) -> None:
        pass


def run(star: str, out: Path, n_images: int, inserter_class, batch_size: int) -> dict:
    seconds = {"insert": 0.0}

    class Timed(inserter_class):
        def insert(self, *batch):
            start = time.perf_counter()
            super().insert(*batch)
            seconds["insert"] += time.perf_counter() - start

        def flush(self):
            start = time.perf_counter()
            super().flush()
            seconds["insert"] += time.perf_counter() - start

    original = reconstruct.FastInserter
    reconstruct.FastInserter = Timed
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = reconstruct.backproject_dataset(star, out, max_images=n_images, batch_size=batch_size,
                                                  device="cpu", allow_absolute_paths=True)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        reconstruct.FastInserter = original
    return {
        "total_s": total,
        "cpu_s": cpu,
        "images_per_s": n_images / total,
        "insert_s": seconds["insert"],
        "insert_only_images_per_s": n_images / seconds["insert"],
        "half_map_fsc0.5_angstrom": metrics["resolution_fsc0.5_angstrom"],
        "half_map_fsc0.143_angstrom": metrics["resolution_fsc0.143_angstrom"],
    }


def run_commit_version(commit: str, star: str, out: Path, n_images: int, batch_size: int) -> dict:
    """`backproject_dataset` of cryofire/reconstruct.py as it was at `commit` (loaded beside the current package,
    whose other modules it imports), timed as a whole: the code before, float32 CTF included."""
    source = subprocess.run(["git", "show", f"{commit}:cryofire/reconstruct.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    path = out.with_suffix(".reconstruct_at_commit.py")
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("reconstruct_at_commit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = module.backproject_dataset(star, out, max_images=n_images, batch_size=batch_size, device="cpu",
                                         allow_absolute_paths=True)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"commit": commit, "total_s": total, "cpu_s": cpu, "images_per_s": n_images / total,
            "half_map_fsc0.5_angstrom": metrics["resolution_fsc0.5_angstrom"],
            "half_map_fsc0.143_angstrom": metrics["resolution_fsc0.143_angstrom"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--star", help="particle star file with poses (default: simulate one)")
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-data/backproject_speed"))
    parser.add_argument("-n", "--n-images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--skip-old", action="store_true", help="time only the new insertion")
    parser.add_argument("--before-commit", help="also time backproject_dataset as it was at this git commit")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    star = args.star
    if star is None:
        star = str(args.workdir / "sim" / "particles.star")
        if not Path(star).exists():
            subprocess.run([str(BIN / "cryofire"), "simulate", "-o", str(args.workdir / "sim"), "-n", "2000",
                            "--box", "64", "--snr", "100"], check=True)
    summary = {"star": star, "n_images": args.n_images, "batch_size": args.batch_size,
               "torch_threads": torch.get_num_threads()}
    new_out = args.workdir / "new.mrc"
    summary["new_FastInserter"] = run(star, new_out, args.n_images, reconstruct.FastInserter, args.batch_size)
    if not args.skip_old:
        old_out = args.workdir / "old.mrc"
        summary["old_Backprojector_insert"] = run(star, old_out, args.n_images, PhysicsInserter, args.batch_size)
        new_volume, _ = read_volume(new_out)
        old_volume, _ = read_volume(old_out)
        summary["max_abs_volume_difference_relative_to_max"] = float(
            np.abs(new_volume - old_volume).max() / np.abs(old_volume).max()
        )
        old, new = summary["old_Backprojector_insert"], summary["new_FastInserter"]
        summary["speedup_wall"] = old["total_s"] / new["total_s"]
        summary["speedup_cpu"] = old["cpu_s"] / new["cpu_s"]
        summary["speedup_insert_wall"] = old["insert_s"] / new["insert_s"]
    if args.before_commit:
        summary["at_commit"] = run_commit_version(args.before_commit, star, args.workdir / "at_commit.mrc",
                                                  args.n_images, args.batch_size)
        summary["speedup_wall_vs_commit"] = summary["at_commit"]["total_s"] / summary["new_FastInserter"]["total_s"]
        summary["speedup_cpu_vs_commit"] = summary["at_commit"]["cpu_s"] / summary["new_FastInserter"]["cpu_s"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
