"""ImageEncoder: stage count from the box, output shapes, proper rotations, bounded shifts and
log-variances, the identity start used by pose refinement, the in-plane canonical option (axis angle of an
elongated blob; predictions that turn with the image) and the re-centring option."""

from __future__ import annotations

import math

import pytest
import torch

from cryofire.errors import ConfigError
from cryofire.model import EncoderConfig, ImageEncoder, ModelConfig, num_stages
from cryofire.physics import (circular_mask, fft2_centered, ifft2_centered, inplane_rotation_matrix, rotate_images,
                              soft_circular_window)
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


def _smooth_windowed_images(count: int, size: int, seed: int) -> torch.Tensor:
    """Random low-resolution images inside the model's window (B, D, D)."""
    noise = torch.randn(count, size, size, generator=torch.Generator().manual_seed(seed))
    spectrum = fft2_centered(noise) * circular_mask(size, size / 6)
    return ifft2_centered(spectrum).real * soft_circular_window(size, 0.85, 0.99)


def test_axis_angle_of_an_elongated_blob() -> None:
    """An elliptical Gaussian whose long axis is at a from x: the second moment's axis angle is a (mod 180)."""
    encoder = ImageEncoder(32, small_config(inplane_canonical=True))
    c = torch.arange(32.0) - 16
    y, x = torch.meshgrid(c, c, indexing="ij")
    for angle in (30.0, -60.0, 120.0, 3.0):
        a = math.radians(angle)
        along, across = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
        blob = torch.exp(-(along**2) / (2 * 5.0**2) - across**2 / (2 * 2.0**2))
        found = float(encoder.axis_angles_deg(blob[None]))
        assert (found - angle + 90) % 180 - 90 == pytest.approx(0, abs=0.5)


def test_inplane_canonical_encoder_turns_its_predictions_with_the_image() -> None:
    """Turning an image by a quarter turn towards its axis's range turns the predicted pose by Rz(a) and the shift by
    the 2D turn, and leaves z alone: the CNN sees the same canonical image (quarter turns permute pixels)."""
    encoder = ImageEncoder(32, small_config(zdim=3, num_pose_heads=2, inplane_canonical=True)).eval()
    torch.nn.init.normal_(encoder.shift_head.weight, std=0.3)
    images = _smooth_windowed_images(6, 32, seed=2)
    angles = encoder.axis_angles_deg(images)
    turns = torch.where(angles <= 0, 90.0, -90.0)  # keeps each axis angle inside (-90, 90]
    with torch.no_grad():
        before, after = encoder(images), encoder(rotate_images(images, turns))
    assert torch.allclose(encoder.axis_angles_deg(rotate_images(images, turns)), angles + turns, atol=1e-3)
    turn = inplane_rotation_matrix(turns)[:, None]
    assert torch.allclose(after.rotations, turn @ before.rotations, atol=1e-4)
    assert torch.allclose(after.shifts_px, (turn[..., :2, :2] @ before.shifts_px[..., None])[..., 0], atol=1e-4)
    assert torch.allclose(after.z_mean, before.z_mean, atol=1e-4)
    assert before.shifts_px.abs().max() > 0.1  # the shift check is not trivially zero


def test_inplane_canonical_refuses_pose_refinement() -> None:
    with pytest.raises(ConfigError, match="encoder_inplane_canonical"):
        ModelConfig(box_size=32, pose_mode="refine", encoder_inplane_canonical=True)


def test_recentring_encoder_reads_the_image_moved_by_its_first_shift() -> None:
    """With a constant shift head (c px) the second pass reads the image moved by c (a whole-pixel move is a
    circular roll) and the shift is c + c: the prediction is the plain encoder's on the moved image."""
    encoder = ImageEncoder(32, small_config(zdim=3, recentre=True)).eval()
    plain = ImageEncoder(32, small_config(zdim=3)).eval()
    c = torch.tensor([2.0, -1.0])  # x, y px
    with torch.no_grad():
        encoder.shift_head.weight.zero_()
        encoder.shift_head.bias.copy_(torch.atanh(c / encoder.config.max_shift_px))
    plain.load_state_dict(encoder.state_dict())
    images = _smooth_windowed_images(4, 32, seed=5)
    moved = torch.roll(images, shifts=(-1, 2), dims=(-2, -1))  # rows by y, columns by x
    with torch.no_grad():
        out, reference, unmoved = encoder(images), plain(moved), plain(images)
    assert torch.allclose(out.rotations, reference.rotations, atol=1e-4)
    assert torch.allclose(out.z_mean, reference.z_mean, atol=1e-4)
    assert torch.allclose(out.shifts_px, 2 * c.expand(4, 1, 2), atol=1e-5)
    assert not torch.allclose(out.rotations, unmoved.rotations, atol=1e-3)  # the move matters


def test_recentring_needs_one_pose_head() -> None:
    with pytest.raises(ConfigError, match="single pose head"):
        EncoderConfig(recentre=True, num_pose_heads=2)
