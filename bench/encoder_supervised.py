"""Diagnostic (issue 3): can the encoder learn poses and states when taught the TRUE ones for the whole run?

    python bench/encoder_supervised.py RUN_DIR EPOCHS [PARTICLES]

The `--teacher em` machinery with its targets replaced by the simulated truth (poses, shifts, states), active for
all of training (`--search-fraction 1`): the decoder is fitted at the true poses and the encoder learns to predict
them; the per-epoch `rotation_error_median_deg` in RUN_DIR/log.jsonl is the encoder's own prediction. Results in
bench/RESULTS.md ("Third session").
"""
from __future__ import annotations

import argparse

import torch

from cryofire.io import read_star
from cryofire.train import TrainConfig
from cryofire.train.loop import Trainer, launch_from_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("epochs", type=int)
    parser.add_argument("particles", nargs="?", default="/work/bench-data/acc32/prep/train.star",
                        help="preprocessed simulated particles (with true poses and rlnClassNumber)")
    args = parser.parse_args()
    config = TrainConfig(epochs=args.epochs, learning_rate=1e-3, search_fraction=1.0, teacher="em", seed=1)
    trainer = Trainer(args.particles, args.run_dir, config, launch_from_env())
    teacher = trainer.teacher
    teacher.rotations[:], teacher.shifts_px[:] = (values.float() for values in trainer.train_set.poses)
    teacher.classes[:] = torch.from_numpy(read_star(args.particles)["rlnClassNumber"].to_numpy() - 1)
    teacher.round = 0  # targets in place: no EM run
    trainer.fit()
    trainer.finish()


if __name__ == "__main__":
    main()
