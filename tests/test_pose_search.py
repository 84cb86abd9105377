"""The global pose search finds the true poses of simulated images given the true map."""

from __future__ import annotations

import numpy as np
import torch

from cryofire import physics
from cryofire.evaluate import rotation_errors_deg
from cryofire.model.image_formation import HalfPlaneLattice, observed_spectrum
from cryofire.model.pose_search import best_poses, projection_table, search_rotations, shift_grid
from cryofire.simulate.dataset import ImageModel, SimulationConfig, draw_metadata
from cryofire.train.data import CTF_PARAMETER_COLUMNS, ctf_from_parameters


def test_search_recovers_true_poses_and_shifts_with_the_true_map():
    size, n_images = 32, 48
    config = SimulationConfig(n_images=n_images, box_size=size, snr=1.0, shift_std_px=1.0, state_weights=[1.0, 0.0],
                              seed=5)
    table = draw_metadata(config)
    model = ImageModel(config, table)
    images = model.clean_images(np.arange(n_images)).float()
    images = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * images.std()
    volume_ft = physics.fft3_centered(model.true_volume(state=0).double()).to(torch.complex64) / size
    true_rotations = physics.euler_to_matrix(
        *(torch.tensor(table[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))).float()

    lattice = HalfPlaneLattice(size)
    count = lattice.count_within(8.0)
    coords = lattice.coords[:count]
    # The search grid holds the true poses of half the images among random ones: those must be found exactly.
    rotations = torch.cat((search_rotations(4096, seed=0, device=torch.device("cpu")), true_rotations[::2]))
    projections = projection_table(volume_ft, rotations, lattice, count)
    ctf = lattice.gather(ctf_from_parameters(torch.tensor(table[list(CTF_PARAMETER_COLUMNS)].to_numpy(np.float32)),
                                             size), count)
    origins_px = torch.tensor(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float32)) / config.pixel_size_angstrom
    index, shift, _ = best_poses(observed_spectrum(images, lattice, count), ctf, coords, projections, shift_grid(3.0))

    errors = rotation_errors_deg(rotations[index].double().numpy(), true_rotations.double().numpy())
    assert np.median(errors[::2]) < 1.0  # on the grid: found exactly
    assert np.median(errors[1::2]) < 15.0  # off the grid: the nearest of 4096 random rotations (about 12 deg apart)
    assert torch.median((shift - origins_px).norm(dim=-1)) < 0.75  # 1-px shift grid
