"""Training-step throughput of the default model on this machine (images/s), for bench/RESULTS.md.

    python bench/train_step_speed.py --box 32 64 --steps 10

Random images and CTFs (throughput does not depend on content); the decoder at the full frequency radius (the
slowest phase of training); ab initio with the symmetric loss (the default) and with fixed poses.
"""

from __future__ import annotations

import argparse
import time

import torch

from cryofire.model import CryoFireModel, ModelConfig


def images_per_second(box: int, pose_mode: str, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    config = ModelConfig(box_size=box, pose_mode=pose_mode, planned_images=10**9, pose_only_fraction=0.0,
                         marching_fraction=0.0)
    model = CryoFireModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, ctf = torch.randn(batch, box, box), torch.ones(batch, box, box)
    given = {}
    if pose_mode != "abinit":
        given = {"given_rotations": torch.eye(3).expand(batch, 3, 3), "given_shifts_px": torch.zeros(batch, 2)}
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            started = time.perf_counter()
        loss = model(images, ctf, 10**9, **given)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for box in args.box:
        for mode in ("abinit", "fixed"):
            print(f"D={box} {mode}: {images_per_second(box, mode, args.steps, args.batch):.1f} images/s")


if __name__ == "__main__":
    main()
