"""Un-blending a class map that holds one molecule in two frames (cryofire.model.em_unblend)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryofire import physics
from cryofire.evaluate import align_poses, rotation_errors_deg
from cryofire.model.em_init import EMConfig, StochasticEM
from cryofire.model.em_unblend import unblend, unblend_class
from test_em_init import _one_state_images, _state_images

RADIUS_PX = 8.0
# the turn between the two frames of the blend: 130 deg about a tilted axis, like the blends of a simulated set
_AXIS = torch.tensor([0.2, 0.95, 0.1]) / torch.tensor([0.2, 0.95, 0.1]).norm()
TURN = physics.axis_angle_to_matrix(_AXIS * math.radians(130.0)).float()
HALF_TURN = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))  # in plane: a projection's point reflection


def _aligned_errors_deg(rotations: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Rotation errors (deg) after the one global rotation (and hand) that best aligns the poses to the truth."""
    pred, true = rotations.double().numpy(), truth.double().numpy()
    return rotation_errors_deg(align_poses(pred, true).apply(pred), true)


@pytest.mark.parametrize("mirrored", [False, True])
def test_a_map_that_blends_two_frames_is_split_and_its_images_put_in_one(mirrored):
    """Half of 400 SNR-1 images (D=24) are posed in a second frame: the molecule turned by 130 deg, or its mirror
    image (the blends of a simulated set were of this kind: bench/RESULTS.md, tenth session). A map rebuilt from
    these poses blends two copies of the molecule. After un-blending, the poses agree with the truth up to one
    global rotation and hand."""
    em, observed, ctf, truth, shifts = _one_state_images(24, 400)
    second = torch.arange(len(truth)) % 2 == 1
    # the image at pose A in V is at pose diag(-1, -1, 1) A T^T in the mirror image V(-T p) (em_refine's frames)
    other = HALF_TURN @ truth @ TURN.T if mirrored else truth @ TURN
    rotations = torch.where(second[:, None, None], other, truth)
    assert np.mean(_aligned_errors_deg(rotations, truth) > 30) > 0.45
    found = unblend_class(em, observed, ctf, rotations, shifts, RADIUS_PX, sample=400, rounds=4, min_angle_deg=20,
                          generator=torch.Generator().manual_seed(0))
    assert found is not None and found[2] > 0  # a map from the new poses explains the images better
    errors = _aligned_errors_deg(found[0], truth)
    assert np.median(errors) < 6.0 and np.mean(errors > 30) < 0.05


def test_classes_whose_images_share_one_frame_are_left_alone():
    """Two states at their true poses (each class map is one molecule in one frame): the split finds no second
    frame, no pose changes, and the EM's random draws are untouched."""
    _, observed, ctf, truth, shifts, states = _state_images(24, 400, [0.5, 0.5])
    em = StochasticEM(24, len(truth), EMConfig(classes=2, unblend_images=200, unblend_rounds=4))
    draws = em.generator.get_state()
    rotations, new_shifts, changed = unblend(em, observed, ctf, truth, shifts, states, RADIUS_PX)
    assert changed == {} and torch.equal(rotations, truth) and torch.equal(new_shifts, shifts)
    assert torch.equal(em.generator.get_state(), draws)  # the rest of the ab initio draws what it drew before
