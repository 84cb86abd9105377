"""Issue 2 target: `cryofire preprocess` streams a large dataset in bounded memory.

Simulates N images (default 200,000) at D=128 with `cryofire simulate` (SNR 0.1, defaults otherwise), then runs
`/usr/bin/time -v cryofire preprocess <star> -o <out> --box 64` and records its peak RSS (target < 1.5 GB) and
images/s. Then checks the output: image count, pixel size doubled, box 64, and a few images against an independent
numpy Fourier crop + background normalisation of the input images (read with mrcfile, not cryofire).

    .venv/bin/python bench/preprocess_memory.py --workdir /work/bench-data/preprocess_memory

Needs about N * 80 KB of disk for the input stacks plus N * 16 KB for the output (16 GB for 200,000 images).
Prints a JSON summary and writes it to <workdir>/summary.json; `--reuse-sim` skips the simulation when
<workdir>/sim/particles.star exists; `--cleanup` deletes the data at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import starfile

BIN = Path(sys.executable).parent
RSS_LIMIT_BYTES = 1.5e9


def run_timed(command: list[str], log: Path) -> dict:
    """Run `command` under /usr/bin/time -v; wall seconds and peak RSS (bytes) of the command."""
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(["/usr/bin/time", "-v", *command], stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log.read_text()
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}); see {log}")
    return {"command": " ".join(command), "wall_s": wall, **time_v_figures(text), "log": str(log)}


def time_v_figures(text: str) -> dict:
    """Peak RSS (bytes) and CPU seconds (user, system) from /usr/bin/time -v output. The CPU time is the figure
    to compare across runs on a shared machine, where wall time depends on what else is running."""
    field = lambda label: re.search(re.escape(label) + r": ([\d.]+)", text).group(1)  # noqa: E731
    return {"peak_rss_bytes": int(field("Maximum resident set size (kbytes)")) * 1024,
            "user_s": float(field("User time (seconds)")), "system_s": float(field("System time (seconds)"))}


def image_ref(name: str, star_dir: Path) -> tuple[Path, int]:
    """(stack path, 0-based index) of a RELION image name `NNNNNN@path`."""
    index, path = name.split("@", 1)
    path = Path(path)
    return (path if path.is_absolute() else star_dir / path), int(index) - 1


def read_image(name: str, star_dir: Path) -> np.ndarray:
    path, index = image_ref(name, star_dir)
    with mrcfile.mmap(path, permissive=True) as mrc:
        return np.array(mrc.data[index], dtype=np.float64)


def reference_preprocess(image: np.ndarray, out_box: int, mask_fraction: float = 0.85) -> np.ndarray:
    """Independent numpy version: centred FFT, keep the central out_box^2 block, inverse, scale by (d/D)^2,
    then subtract the mean and divide by the (n-1) standard deviation of the pixels outside a centred disk."""
    size = image.shape[-1]
    spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image)))
    start = size // 2 - out_box // 2
    cropped = spectrum[start : start + out_box, start : start + out_box]
    small = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(cropped))).real * (out_box / size) ** 2
    y, x = np.mgrid[:out_box, :out_box] - out_box // 2
    background = np.hypot(x, y) > mask_fraction * out_box / 2
    ring = small[background]
    return (small - ring.mean()) / ring.std(ddof=1)


def particles_block(path: Path) -> tuple[dict, object]:
    blocks = starfile.read(path, always_dict=True)
    return blocks, blocks["particles"]


def check_output(sim_star: Path, prep_star: Path, out_box: int, n_checked: int, seed: int = 0) -> dict:
    sim_blocks, sim = particles_block(sim_star)
    prep_blocks, prep = particles_block(prep_star)
    sim_optics, prep_optics = sim_blocks["optics"], prep_blocks["optics"]
    rng = np.random.default_rng(seed)
    n = len(sim)
    picks = sorted({0, n - 1, *rng.choice(n, size=min(n_checked, n), replace=False).tolist()})
    errors = []
    for i in picks:
        expected = reference_preprocess(read_image(sim["rlnImageName"].iloc[i], sim_star.parent), out_box)
        got = read_image(prep["rlnImageName"].iloc[i], prep_star.parent)
        errors.append(float(np.abs(got - expected).max()))
    with mrcfile.open(image_ref(prep["rlnImageName"].iloc[0], prep_star.parent)[0], header_only=True) as mrc:
        header_pixel = float(mrc.voxel_size.x)
    counts = []
    for stack in sorted({image_ref(name, prep_star.parent)[0] for name in prep["rlnImageName"]}):
        with mrcfile.open(stack, header_only=True) as mrc:
            counts.append(int(mrc.header.nz))
    return {
        "n_input": n,
        "n_output_rows": len(prep),
        "n_output_images_in_stacks": int(sum(counts)),
        "input_pixel_size_angstrom": float(sim_optics["rlnImagePixelSize"].iloc[0]),
        "output_pixel_size_angstrom": float(prep_optics["rlnImagePixelSize"].iloc[0]),
        "output_stack_header_pixel_size_angstrom": header_pixel,
        "output_image_size": int(prep_optics["rlnImageSize"].iloc[0]),
        "same_particle_order_and_poses": bool(
            np.allclose(sim["rlnAngleRot"], prep["rlnAngleRot"]) and np.allclose(sim["rlnDefocusU"], prep["rlnDefocusU"])
        ),
        "checked_images": picks,
        "max_abs_error_vs_numpy_reference": max(errors),
        "per_image_max_abs_error": errors,
    }


_OLD_PATH = (
    "import sys, cryofire.physics as f; "
    "f.downsample_images = lambda x, n: f.ifft2_centered(f.fourier_crop2(f.fft2_centered(x), n)).real"
    " * (n / x.shape[-1]) ** 2; "
    "from cryofire.cli import main; sys.exit(main(sys.argv[1:]))"
)


def baseline(sim_star: Path, work: Path, n_images: int, out_box: int) -> dict:
    """Preprocess the first `n_images` with the current code and with the centred-FFT downsampling used before
    (the centred crop physics.downsample_images used then, monkeypatched in), one after the other under the same conditions."""
    from cryofire.io import read_star, write_star

    subset = sim_star.parent / f"first_{n_images}.star"  # beside the stacks: relative image paths
    write_star(subset, read_star(sim_star).iloc[:n_images].reset_index(drop=True))
    result = {"n_images": n_images}
    for name, prefix in (("current", [str(BIN / "cryofire")]), ("centred_fft_downsample", [sys.executable, "-c", _OLD_PATH])):
        out = work / f"subset_prep_{name}"
        shutil.rmtree(out, ignore_errors=True)
        figures = run_timed([*prefix, "preprocess", str(subset), "-o", str(out), "--box", str(out_box)],
                            work / f"subset_{name}.log")
        figures["images_per_s"] = n_images / figures["wall_s"]
        figures["images_per_cpu_s"] = n_images / (figures["user_s"] + figures["system_s"])
        result[name] = figures
        shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-data/preprocess_memory"))
    parser.add_argument("-n", "--n-images", type=int, default=200_000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--out-box", type=int, default=64)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--check-images", type=int, default=16, help="random images compared with numpy")
    parser.add_argument("--reuse-sim", action="store_true")
    parser.add_argument("--baseline-images", type=int, default=0,
                        help="also compare with the previous downsampling on the first N images")
    parser.add_argument("--skip-full", action="store_true", help="with --reuse-sim: only the baseline comparison")
    parser.add_argument("--cleanup", action="store_true")
    args = parser.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    sim_dir, prep_dir = work / "sim", work / "prep"
    summary: dict = {"n_images": args.n_images, "box": args.box, "out_box": args.out_box, "snr": args.snr}
    if not (args.reuse_sim and (sim_dir / "particles.star").exists()):
        shutil.rmtree(sim_dir, ignore_errors=True)
        simulate = [str(BIN / "cryofire"), "simulate", "-o", str(sim_dir), "-n", str(args.n_images),
                    "--box", str(args.box), "--snr", str(args.snr)]
        summary["simulate"] = run_timed(simulate, work / "simulate.log")
        summary["simulate"]["images_per_s"] = args.n_images / summary["simulate"]["wall_s"]
        cpu = summary["simulate"]["user_s"] + summary["simulate"]["system_s"]
        summary["simulate"]["images_per_cpu_s"] = args.n_images / cpu
    if args.baseline_images:
        summary["baseline"] = baseline(sim_dir / "particles.star", work, args.baseline_images, args.out_box)
    if args.skip_full:
        (work / "baseline.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        return
    shutil.rmtree(prep_dir, ignore_errors=True)
    preprocess = [str(BIN / "cryofire"), "preprocess", str(sim_dir / "particles.star"), "-o", str(prep_dir),
                  "--box", str(args.out_box)]
    summary["preprocess"] = run_timed(preprocess, work / "preprocess.log")
    summary["preprocess"]["images_per_s"] = args.n_images / summary["preprocess"]["wall_s"]
    cpu = summary["preprocess"]["user_s"] + summary["preprocess"]["system_s"]
    summary["preprocess"]["images_per_cpu_s"] = args.n_images / cpu
    summary["preprocess"]["rss_below_1.5GB"] = summary["preprocess"]["peak_rss_bytes"] < RSS_LIMIT_BYTES
    summary["check"] = check_output(sim_dir / "particles.star", prep_dir / "particles.star", args.out_box,
                                    args.check_images)
    check = summary["check"]
    summary["check"]["ok"] = bool(
        check["n_output_rows"] == check["n_output_images_in_stacks"] == args.n_images
        and abs(check["output_pixel_size_angstrom"] / check["input_pixel_size_angstrom"] - args.box / args.out_box) < 1e-6
        and abs(check["output_stack_header_pixel_size_angstrom"] - check["output_pixel_size_angstrom"]) < 1e-3
        and check["output_image_size"] == args.out_box
        and check["same_particle_order_and_poses"]
        and check["max_abs_error_vs_numpy_reference"] < 1e-4
    )
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    if args.cleanup:
        shutil.rmtree(sim_dir, ignore_errors=True)
        shutil.rmtree(prep_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
