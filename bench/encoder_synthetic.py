"""Diagnostic (issue 3): does the encoder learn poses and states from UNLIMITED images, simulated from good maps?

    python bench/encoder_synthetic.py [--star .../train.star] [--heldout .../heldout.star] [--minutes 20]
                                      [--phase-flip --lowpass-px 12] [--device cuda --batch 512]
                                      [--encoder '{"channels": 64}']

The two class maps are rebuilt from the TRUE poses and states of 10,000 SNR-0.1 images (the best maps an ab initio
could reach), and the noise spectrum from the residuals at the true poses (`cryofire.model.map_images`, as the "em"
teacher's `simulated_batch_size` does from its own poses). Every step draws fresh images from them (uniform
rotations, both states, the data's shifts and CTFs, coloured noise, the model's window), so the encoder never sees an
image twice. It is trained by supervision (chordal rotation loss, shift error,
cross-entropy of its two latent coordinates as class logits). Reported every `--report-every` steps (200): median
rotation error and class accuracy of its predictions on 1,000 synthetic images and on 2,000 REAL held-out images (no
alignment needed: the maps are in the true frame). `--phase-flip` multiplies every input's spectrum by the sign of
its CTF and `--lowpass-px` zeroes it beyond that radius. `--grid-bins G` adds a classification head over G random
rotations to the pose branch (cross-entropy against soft labels exp(-d^2 / 2 sigma^2) of the geodesic distance d to
each bin, `--grid-sigma-deg`) and also reports the error of its best bin. `--jitter-px J` (a re-centring encoder,
`--encoder '{"recentre": true}'`) trains its two passes apart: the first on the images, the second on the images
re-centred by the true shift plus Gaussian jitter of J px per axis (better here, not end to end: eighteenth session).
Results in bench/RESULTS.md ("Fourth session", "Eighth session", "Twelfth session" to "Eighteenth session").
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from abinit_em import load_spectra
from cryofire.io import read_star
from cryofire.model.em_init import EMConfig, StochasticEM
from cryofire.model.encoder import EncoderConfig, EncoderOutput, ImageEncoder
from cryofire.model.map_images import MapImageSimulator, simulator_from_assignment
from cryofire.physics import (fft2_centered, geodesic_distance_deg, ifft2_centered, random_rotations, shift_images,
                              soft_circular_window)
from cryofire.physics.ctf import ctf_from_parameters
from cryofire.physics.lattice import frequency_grid_2d
from cryofire.train.data import ParticleImages


class EncoderInput:
    """The encoder's input from raw images (B, D, D): windowed, optionally phase-flipped by the CTF and low-passed."""

    def __init__(self, size: int, phase_flip: bool, lowpass_px: float, device: torch.device) -> None:
        self.window = soft_circular_window(size, 0.85, 0.99).float().to(device)
        radius = frequency_grid_2d(size, device=device).norm(dim=-1) * size
        self.keep, self.phase_flip = (radius <= lowpass_px).float(), phase_flip

    def __call__(self, images: torch.Tensor, ctf_parameters: torch.Tensor) -> torch.Tensor:
        if not self.phase_flip and self.keep.all():
            return images * self.window
        sign = torch.sign(ctf_from_parameters(ctf_parameters, images.shape[-1])) if self.phase_flip else 1.0
        return ifft2_centered(fft2_centered(images * self.window) * sign * self.keep).real


def true_pose_simulator(star: str, device: torch.device) -> MapImageSimulator:
    """Class maps from the TRUE poses and states of the first 10,000 images of ``star`` (simulated data)."""
    data = load_spectra(star, 10_000)
    rows = list(range(len(data["states"])))
    ctf_parameters = ParticleImages(read_star(star)).__getitems__(rows)["ctf_parameters"].to(device)
    em = StochasticEM(data["size"], 0, EMConfig(classes=2), device)
    window_power = float(soft_circular_window(data["size"], 0.85, 0.99).float().square().mean())
    return simulator_from_assignment(em, data["observed"].to(device), data["ctf"].to(device),
                                     data["rotations"].float().to(device), data["shifts_px"].float().to(device),
                                     torch.from_numpy(data["states"]).to(device), ctf_parameters, window_power)


def held_out(star: str, prepare: EncoderInput, device: torch.device, n: int = 2000) -> tuple[torch.Tensor, ...]:
    """The encoder's input, true rotations and states of the first ``n`` images of ``star``."""
    table = read_star(star)
    batch = ParticleImages(table).__getitems__(list(range(n)))
    images = prepare(batch["images"].to(device), batch["ctf_parameters"].to(device))
    states = torch.from_numpy(table["rlnClassNumber"].to_numpy()[:n] - 1).to(device)
    return images, batch["rotations"].float().to(device), states


class GridHead(torch.nn.Module):
    """Logits (B, G) over G fixed random rotations, read from the encoder's pose features (its pose MLP's output)."""

    def __init__(self, encoder: ImageEncoder, bins: int, sigma_deg: float) -> None:
        super().__init__()
        self.register_buffer("rotations", random_rotations(bins, generator=torch.Generator().manual_seed(11)).float())
        self.linear = torch.nn.Linear(encoder.config.hidden_dim, bins)
        self.sigma_deg = sigma_deg
        encoder.pose_mlp.register_forward_hook(lambda _module, _inputs, output: setattr(self, "features", output))

    def loss(self, rotations: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against soft labels by geodesic distance to the true rotations (B, 3, 3)."""
        distance = geodesic_distance_deg(rotations[:, None], self.rotations[None])
        target = torch.softmax(-(distance / self.sigma_deg).square() / 2, dim=1)
        return torch.nn.functional.cross_entropy(self.linear(self.features), target)

    def best(self) -> torch.Tensor:
        """The best bin's rotation (B, 3, 3) for the last batch encoded."""
        return self.rotations[self.linear(self.features).argmax(1)]


def scores(encoder: ImageEncoder, grid: GridHead | None, images: torch.Tensor, rotations: torch.Tensor,
           states: torch.Tensor) -> str:
    """Median rotation error (and the grid's), per cent of states right."""
    encoder.eval()
    with torch.no_grad():
        out = encoder(images)
        best = None if grid is None else grid.best()
    encoder.train()
    text = f"{geodesic_distance_deg(out.rotations[:, 0], rotations).median():.1f} deg"
    if best is not None:
        text += f" (grid {geodesic_distance_deg(best, rotations).median():.1f} deg)"
    return text + f" / {100 * (out.z_mean.argmax(1) == states).float().mean():.1f} %"


def trained_passes(encoder: ImageEncoder, images: torch.Tensor, shifts_px: torch.Tensor, jitter_px: float
                   ) -> list[tuple[EncoderOutput, torch.Tensor]]:
    """(output, its shift (B, 2) px for the images as given) of each pass the loss trains: the encoder's; with
    ``jitter_px`` its first pass on the images and its second on them re-centred by the true shifts plus jitter."""
    if not jitter_px:
        out = encoder(images)
        return [(out, out.shifts_px[:, 0])]
    moved_by = shifts_px + jitter_px * torch.randn_like(shifts_px)
    first, second = encoder.encode_once(images), encoder.encode_once(shift_images(images, moved_by))
    return [(first, first.shifts_px[:, 0]), (second, second.shifts_px[:, 0] + moved_by)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--star", default="/work/bench-data/acc32/prep/train.star")
    parser.add_argument("--heldout", default="/work/bench-data/acc32/prep/heldout.star")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--phase-flip", action="store_true")
    parser.add_argument("--lowpass-px", type=float, default=1e9)
    parser.add_argument("--report-every", type=int, default=200, help="steps between reports")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder", type=json.loads, default={}, help="EncoderConfig overrides as JSON")
    parser.add_argument("--grid-bins", type=int, default=0, help="rotations of a classification head (0: none)")
    parser.add_argument("--grid-sigma-deg", type=float, default=10.0, help="width of the grid head's soft labels")
    parser.add_argument("--cosine", action="store_true", help="learning rate 1e-3 decaying to 0 over --minutes")
    parser.add_argument("--clean-start", type=float, nargs=2, metavar=("SCALE", "IMAGES"), default=(1.0, 0),
                        help="noise amplitude SCALE x the data's at first, rising linearly to 1 over IMAGES images")
    parser.add_argument("--jitter-px", type=float, default=0.0,
                        help="train a re-centring encoder's passes apart, the second's input jittered by this (px)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    simulator = true_pose_simulator(args.star, device)
    prepare = EncoderInput(simulator.size, args.phase_flip, args.lowpass_px, device)
    fixed = simulator.draw(1000, torch.Generator().manual_seed(7))
    synthetic = (prepare(fixed.images, fixed.ctf_parameters), fixed.rotations, fixed.classes)
    real = held_out(args.heldout, prepare, device)
    encoder = ImageEncoder(simulator.size, EncoderConfig(**{"zdim": 2, **args.encoder})).to(device)
    grid = GridHead(encoder, args.grid_bins, args.grid_sigma_deg).to(device) if args.grid_bins else None
    optimiser = torch.optim.Adam([*encoder.parameters(), *(grid.parameters() if grid else [])], 1e-3)
    generator = torch.Generator().manual_seed(0)
    started, step = time.time(), 0
    while (elapsed := time.time() - started) < 60 * args.minutes:
        scale, ramp = args.clean_start
        drawn = simulator.draw(args.batch, generator, min(1.0, scale + (1 - scale) * args.batch * step / max(ramp, 1)))
        passes = trained_passes(encoder, prepare(drawn.images, drawn.ctf_parameters), drawn.shifts_px, args.jitter_px)
        loss = sum((out.rotations[:, 0] - drawn.rotations).square().sum((-2, -1)).mean()
                   + (shifts_px - drawn.shifts_px).square().sum(-1).mean() / 9
                   + torch.nn.functional.cross_entropy(out.z_mean, drawn.classes) for out, shifts_px in passes)
        loss = loss + (grid.loss(drawn.rotations) if grid else 0.0)
        optimiser.zero_grad()
        loss.backward()
        if args.cosine:
            optimiser.param_groups[0]["lr"] = 0.5e-3 * (1 + math.cos(math.pi * min(elapsed / (60 * args.minutes), 1)))
        optimiser.step()
        step += 1
        if step % args.report_every == 0:
            print(f"{args.batch * step} images, {time.time() - started:.0f} s: synthetic "
                  f"{scores(encoder, grid, *synthetic)} states right; real held-out {scores(encoder, grid, *real)}",
                  flush=True)


if __name__ == "__main__":
    main()
