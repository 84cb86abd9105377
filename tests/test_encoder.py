"""ImageEncoder: stage count from the box, output shapes, proper rotations, bounded shifts and
log-variances, and the identity start used by pose refinement."""

from __future__ import annotations

import pytest
import torch

from cryofire.errors import ConfigError
from cryofire.model import EncoderConfig, ImageEncoder, num_stages
from cryofire.model.encoder import LOGVAR_BOUND


def small_config(**overrides) -> EncoderConfig:
    return EncoderConfig(**({"channels": 8, "max_channels": 16, "hidden_dim": 32} | overrides))


@pytest.mark.parametrize(
    ("box_size", "stages"), [(16, 2), (32, 3), (64, 4), (100, 4), (128, 5), (256, 6)]
)
def test_stages_bring_the_map_to_about_4_px(box_size: int, stages: int) -> None:
    assert num_stages(box_size) == stages


@pytest.mark.parametrize("box_size", [16, 40, 64])
def test_shapes_and_proper_rotations(box_size: int) -> None:
    encoder = ImageEncoder(box_size, small_config(zdim=5, num_pose_heads=3))
    out = encoder(torch.randn(4, box_size, box_size))
    assert out.rotations.shape == (4, 3, 3, 3) and out.shifts_px.shape == (4, 3, 2)
    assert out.z_mean.shape == (4, 5) and out.z_logvar is None
    identity = torch.eye(3).expand(4, 3, 3, 3)
    assert torch.allclose(out.rotations @ out.rotations.transpose(-1, -2), identity, atol=1e-5)
    assert torch.allclose(torch.linalg.det(out.rotations), torch.ones(4, 3), atol=1e-5)


def test_shifts_and_logvar_are_bounded() -> None:
    encoder = ImageEncoder(16, small_config(zdim=2, variational=True, max_shift_px=2.5))
    with torch.no_grad():
        for head in (encoder.shift_head, encoder.conformation_head):
            head.weight.fill_(50.0)
    out = encoder(100 * torch.randn(8, 16, 16))
    assert out.shifts_px.abs().max() <= 2.5 and out.shifts_px.abs().max() > 2.0
    assert out.z_logvar.abs().max() <= LOGVAR_BOUND


def test_shifts_start_at_zero_and_are_trainable() -> None:
    encoder = ImageEncoder(16, small_config())
    out = encoder(torch.randn(3, 16, 16))
    assert torch.equal(out.shifts_px, torch.zeros(3, 1, 2))
    out.shifts_px.sum().backward()
    assert encoder.shift_head.weight.grad.abs().sum() > 0


def test_identity_start_and_homogeneous_encoder() -> None:
    encoder = ImageEncoder(32, small_config(zdim=0, num_pose_heads=2))
    encoder.start_at_identity()
    out = encoder(torch.randn(3, 32, 32))
    assert torch.allclose(out.rotations, torch.eye(3).expand(3, 2, 3, 3))
    assert out.z_mean.shape == (3, 0) and encoder.conformation_head is None


def test_per_image_scale_does_not_change_the_prediction() -> None:
    encoder = ImageEncoder(16, small_config())
    images = torch.randn(2, 16, 16)
    rescaled = encoder(7.0 * images + 3.0).rotations
    assert torch.allclose(encoder(images).rotations, rescaled, atol=1e-4)


def test_invalid_options_raise() -> None:
    with pytest.raises(ConfigError):
        EncoderConfig(num_pose_heads=0)
