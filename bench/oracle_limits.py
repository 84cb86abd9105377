"""What the simulated images allow at best (issue 3): classification and pose information with the TRUE maps.

    python bench/oracle_limits.py [--sim /work/bench-data/acc32/sim] [--n 1000]

1. Confusion of the oracle classifier: each noisy image is compared with the clean images of both true states at its
   true pose, CTF and shift; the smaller residual wins (the Bayes classifier for white noise). Also after Fourier
   cropping to 32, 24 and 16 px (what a D=32 training run sees, and less).
2. Pose information: the expected log-likelihood drop ``|P(R') - P(R)|^2 / (2 sigma^2)`` when the true rotation is
   perturbed by delta degrees about a random axis; for a quadratic drop ``dLL = delta^2 / (2 s^2)`` the pose
   estimate's standard deviation per axis is ``s = delta / sqrt(2 dLL)``.
Results in bench/RESULTS.md ("Ab initio by stochastic EM").
"""
import argparse
import json

import mrcfile
import numpy as np
import torch

from cryofire import physics
from cryofire.simulate.dataset import ImageModel, SimulationConfig, draw_metadata

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--sim", default="/work/bench-data/acc32/sim", help="a `cryofire simulate` output folder")
parser.add_argument("--n", type=int, default=1000, help="images to classify")
args = parser.parse_args()
sim = args.sim
truth = json.load(open(f"{sim}/truth.json"))
c = truth["config"]; c["hinge_range_deg"] = tuple(c["hinge_range_deg"])
cfg = SimulationConfig(**c)
table = draw_metadata(cfg)
model = ImageModel(cfg, table)
n = args.n
stack = mrcfile.mmap(f"{sim}/stacks/particles_0000.mrcs", permissive=True).data
noisy = torch.from_numpy(np.array(stack[:n], dtype=np.float32))
labels = table["rlnClassNumber"].to_numpy()[:n] - 1
clean = []
for state in (0, 1):
    t = table.iloc[:n].copy()
    t["hinge_deg"] = cfg.hinge_range_deg[state]
    model.table = t
    clean.append(torch.cat([model.clean_images(np.arange(i, min(i + 500, n))) for i in range(0, n, 500)]))
model.table = table
true_clean = torch.where(torch.from_numpy(labels == 0)[:, None, None], clean[0], clean[1])
print("noise std est", (noisy - true_clean).std().item(), "expected", truth["noise_std"])

def crop(x, d):
    f = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    D = x.shape[-1]; a = D // 2 - d // 2
    return f[..., a:a + d, a:a + d]

for name, tf in (("D=64", lambda x: torch.fft.fft2(x)), ("D=32 crop", lambda x: crop(x, 32)), ("D=24 crop", lambda x: crop(x, 24)), ("D=16 crop", lambda x: crop(x, 16))):
    y = tf(noisy); r = [((y - tf(cl)).abs() ** 2).sum((-2, -1)) for cl in clean]
    pred = (r[1] < r[0]).numpy().astype(int)
    err = (pred != labels).mean()
    print(f"{name}: oracle confusion {100*err:.2f}%  (n={n})")

# Pose information: expected log-likelihood drop when the rotation is perturbed by delta degrees (true state).
sigma2 = truth["noise_std"] ** 2
m = 300
rng = np.random.default_rng(0)
base = table.iloc[:m].copy()
R = physics.euler_to_matrix(*(torch.tensor(base[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
model.table = base
clean0 = model.clean_images(np.arange(m))
for delta in (1.0, 2.0, 4.0, 8.0):
    axis = torch.from_numpy(rng.normal(size=(m, 3))); axis = axis / axis.norm(dim=1, keepdim=True)
    Rp = R @ physics.axis_angle_to_matrix(axis * np.deg2rad(delta))
    rot, tilt, psi = physics.matrix_to_euler(Rp)
    pert = base.copy(); pert["rlnAngleRot"], pert["rlnAngleTilt"], pert["rlnAnglePsi"] = rot.numpy(), tilt.numpy(), psi.numpy()
    model.table = pert
    cp = model.clean_images(np.arange(m))
    for name, tf, norm in (("D=64", lambda x: torch.fft.fft2(x), 64*64), ("D=32", lambda x: crop(x, 32), 64*64), ("D=16", lambda x: crop(x, 16), 64*64)):
        dll = ((tf(cp) - tf(clean0)).abs() ** 2).sum((-2, -1)) / norm / (2 * sigma2)
        print(f"delta {delta} deg {name}: expected dLL median {dll.median():.1f}  10th pct {np.percentile(dll.numpy(), 10):.1f}")
