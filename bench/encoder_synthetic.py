"""Diagnostic (issue 3): does the encoder learn poses and states from UNLIMITED images, simulated from good maps?

    python bench/encoder_synthetic.py [--star .../train.star] [--heldout .../heldout.star] [--minutes 20]
                                      [--phase-flip --lowpass-px 12] [--device cuda --batch 512]
                                      [--encoder '{"channels": 64}']

The two class maps are rebuilt from the TRUE poses and states of 10,000 SNR-0.1 images (`em_init.reconstruct`, the
best maps an ab initio could reach), and the noise spectrum from the residuals at the true poses. Every step draws
fresh images from them (uniform rotations, both states, the data's shifts and CTFs, coloured noise, the model's
window), so the encoder never sees an image twice. It is trained by supervision (chordal rotation loss, shift error,
cross-entropy of its two latent coordinates as class logits). Reported every `--report-every` steps (200): median
rotation error and class accuracy of its predictions on 1,000 synthetic images and on 2,000 REAL held-out images (no
alignment needed: the maps are in the true frame). `--phase-flip` multiplies every input's spectrum by the sign of
its CTF and `--lowpass-px` zeroes it beyond that radius. Results in bench/RESULTS.md ("Fourth session").
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
from cryofire.model.em_refine import reconstruct
from cryofire.model.encoder import EncoderConfig, ImageEncoder
from cryofire.model.image_formation import recentre
from cryofire.physics import (fft2_centered, geodesic_distance_deg, ifft2_centered, random_rotations,
                              soft_circular_window)
from cryofire.physics.ctf import ctf_from_parameters
from cryofire.physics.lattice import frequency_grid_2d
from cryofire.train.data import ParticleImages


class Simulator:
    """Fresh noisy images (B, D, D) with their rotations, shifts (px) and states, from two class maps."""

    def __init__(self, data: dict, phase_flip: bool, lowpass_px: float, device: torch.device) -> None:
        size = self.size = data["size"]
        self.device = device
        states = torch.from_numpy(data["states"]).to(device)
        self.em = em = StochasticEM(size, 0, EMConfig(classes=2), device)
        rotations, shifts = data["rotations"].float().to(device), data["shifts_px"].float().to(device)
        observed, ctf = data["observed"].to(device), data["ctf"].to(device)
        reconstruct(em, observed, ctf, rotations, shifts, states, size / 2)
        count = em.lattice.count_within(size / 2)
        residual = torch.zeros(count, device=device)
        for part in torch.arange(len(states), device=device).split(500):
            slices = torch.zeros(len(part), count, 2, device=device)
            for k in (0, 1):
                mine = states[part] == k
                slices[mine] = em._class_slices(em._points(rotations[part][mine], count), [k])
            moved = recentre(observed[part], em.lattice.coords[:count], shifts[part][:, None])[:, 0]
            residual += (moved - ctf[part][..., None] * slices).square().sum(-1).sum(0)
        noise_power = em._per_shell(residual / len(states), count)
        self.window = soft_circular_window(size, 0.85, 0.99).float().to(device)
        self.frequencies = frequency_grid_2d(size).reshape(-1, 2).float().to(device)
        radius = self.frequencies.norm(dim=-1) * size
        shell = radius.round().long().clamp_max(size // 2)
        self.noise_amplitude = (noise_power[shell] / self.window.square().mean()).sqrt().reshape(size, size)
        self.keep = (radius <= lowpass_px).float().reshape(size, size)
        self.phase_flip, self.shifts, self.ctf_parameters = phase_flip, shifts, data["ctf_parameters"].to(device)

    def prepare(self, images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
        """The encoder's input: optionally phase-flipped by the CTF (B, D, D) and low-passed."""
        sign = torch.sign(ctf) if self.phase_flip else 1.0
        return ifft2_centered(fft2_centered(images) * sign * self.keep).real

    def draw(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        size, device = self.size, self.device
        rotations = random_rotations(batch, generator=generator).float().to(device)
        states = torch.randint(0, 2, (batch,), generator=generator).to(device)
        shifts = self.shifts[torch.randint(0, len(self.shifts), (batch,), generator=generator).to(device)]
        pick = torch.randint(0, len(self.ctf_parameters), (batch,), generator=generator).to(device)
        ctf = ctf_from_parameters(self.ctf_parameters[pick], size)
        points = (self.frequencies * self.em.grid_size) @ rotations[:, :2, :]
        values = torch.zeros(batch, size * size, 2, device=device)
        for k in (0, 1):
            mine = states == k
            values[mine] = self.em._class_slices(points[mine], [k])
        phase = 2 * math.pi * (shifts @ self.frequencies.T)  # the particle sits at -shift
        spectra = torch.view_as_complex(values) * ctf.reshape(batch, -1) * torch.polar(torch.ones_like(phase), phase)
        signal = ifft2_centered(spectra.reshape(batch, size, size) * size).real
        white = torch.randn(batch, size, size, generator=generator).to(device)
        noise = ifft2_centered(fft2_centered(white) * self.noise_amplitude).real
        return self.prepare(self.window * (signal + noise), ctf), rotations, shifts, states


def held_out(star: str, simulator: Simulator, n: int = 2000) -> tuple[torch.Tensor, ...]:
    table = read_star(star)
    batch = ParticleImages(table).__getitems__(list(range(n)))
    device = simulator.device
    ctf = ctf_from_parameters(batch["ctf_parameters"].to(device), simulator.size)
    images = simulator.prepare(batch["images"].to(device) * simulator.window, ctf)
    states = torch.from_numpy(table["rlnClassNumber"].to_numpy()[:n] - 1).to(device)
    return images, batch["rotations"].float().to(device), states


def scores(encoder: ImageEncoder, images: torch.Tensor, rotations: torch.Tensor, states: torch.Tensor
           ) -> tuple[float, float]:
    encoder.eval()
    with torch.no_grad():
        out = encoder(images)
    encoder.train()
    error = geodesic_distance_deg(out.rotations[:, 0], rotations).median()
    return float(error), float((out.z_mean.argmax(1) == states).float().mean())


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
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = load_spectra(args.star, 10_000)
    rows = list(range(len(data["states"])))
    data["ctf_parameters"] = ParticleImages(read_star(args.star)).__getitems__(rows)["ctf_parameters"]
    simulator = Simulator(data, args.phase_flip, args.lowpass_px, device)
    synthetic = simulator.draw(1000, torch.Generator().manual_seed(7))
    real = held_out(args.heldout, simulator)
    encoder = ImageEncoder(simulator.size, EncoderConfig(**{"zdim": 2, **args.encoder})).to(device)
    optimiser = torch.optim.Adam(encoder.parameters(), 1e-3)
    started, step = time.time(), 0
    while time.time() - started < 60 * args.minutes:
        images, rotations, shifts, states = simulator.draw(args.batch)
        out = encoder(images)
        loss = ((out.rotations[:, 0] - rotations).square().sum((-2, -1)).mean()
                + (out.shifts_px[:, 0] - shifts).square().sum(-1).mean() / 9
                + torch.nn.functional.cross_entropy(out.z_mean, states))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step += 1
        if step % args.report_every == 0:
            (s_err, s_acc), (r_err, r_acc) = scores(encoder, *synthetic[:2], synthetic[3]), scores(encoder, *real)
            print(f"{args.batch * step} images, {time.time() - started:.0f} s: synthetic {s_err:.1f} deg / "
                  f"{100 * s_acc:.1f} % "
                  f"states right; real held-out {r_err:.1f} deg / {100 * r_acc:.1f} %", flush=True)


if __name__ == "__main__":
    main()
