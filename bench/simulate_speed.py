"""Simulation speed at D=128: `cryofire simulate` end to end, and the image model (phantom projections, CTF,
noise) per chunk, now and as it was at a git commit (loaded beside the current package).

    .venv/bin/python bench/simulate_speed.py -n 10000 --before-commit de7a17e

Prints a JSON summary: images/s (wall and per CPU second) of `cryofire simulate` under /usr/bin/time -v, and of
`ImageModel.clean_images` + noise for chunks of 500 images, current and at the commit, in the same process, with
the largest difference between the two (the old code computed the CTF in float32, whose electron wavelength is
0.5% off at 300 kV, so the images differ by a few % of their range; see RESULTS.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cryofire.simulate.dataset import ImageModel, SimulationConfig, draw_metadata

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def module_at_commit(commit: str, path: str, name: str, replace: dict[str, str], folder: Path):
    source = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True, check=True,
                            cwd=REPO).stdout
    for old, new in replace.items():
        source = source.replace(old, new)
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def time_model(model, table_rows: int, chunk: int, repeats: int, noise_std: float) -> tuple[dict, np.ndarray]:
    indices = np.arange(chunk)
    model.clean_images(indices)  # warm up
    rng = np.random.default_rng(0)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        images = model.clean_images(indices).numpy()
        images = (images + noise_std * rng.standard_normal(images.shape, dtype=np.float32)).astype(np.float32)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    n = repeats * chunk
    return {"images_per_s": n / wall, "images_per_cpu_s": n / cpu}, model.clean_images(indices).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-data/simulate_speed"))
    parser.add_argument("-n", "--n-images", type=int, default=10_000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--before-commit", help="also time the image model as it was at this commit")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"box": args.box}

    out = args.workdir / "sim"
    shutil.rmtree(out, ignore_errors=True)
    log = args.workdir / "simulate.log"
    command = [str(BIN / "cryofire"), "simulate", "-o", str(out), "-n", str(args.n_images), "--box", str(args.box),
               "--snr", "0.1"]
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(["/usr/bin/time", "-v", *command], stdout=handle, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    text = log.read_text()
    cpu = sum(float(re.search(label + r": ([\d.]+)", text).group(1))
              for label in (r"User time \(seconds\)", r"System time \(seconds\)"))
    summary["cli"] = {"command": " ".join(command), "n_images": args.n_images, "wall_s": wall, "cpu_s": cpu,
                      "images_per_s": args.n_images / wall, "images_per_cpu_s": args.n_images / cpu}
    shutil.rmtree(out, ignore_errors=True)

    config = SimulationConfig(n_images=args.chunk, box_size=args.box, snr=0.1)
    table = draw_metadata(config)
    summary["image_model_current"], current = time_model(ImageModel(config, table), len(table), args.chunk,
                                                         args.repeats, 1.0)
    if args.before_commit:
        old_render = module_at_commit(args.before_commit, "cryofire/simulate/render.py", "_render_at_commit", {},
                                      args.workdir)
        old_dataset = module_at_commit(
            args.before_commit, "cryofire/simulate/dataset.py", "_dataset_at_commit",
            {"from cryofire.simulate.render import": "from _render_at_commit import"}, args.workdir)
        assert old_render is sys.modules["_render_at_commit"]
        old_model = old_dataset.ImageModel(config, table)
        summary["image_model_at_commit"], before = time_model(old_model, len(table), args.chunk, args.repeats, 1.0)
        summary["image_model_at_commit"]["commit"] = args.before_commit
        summary["max_abs_difference_over_max"] = float(np.abs(current - before).max() / np.abs(before).max())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
