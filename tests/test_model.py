"""CryoFireModel: shapes and gradients, the forward model against physics.project_volume, the
mirror path end to end, the pose-only phase and the pose modes."""

from __future__ import annotations

import math

import pytest
import torch

from cryofire import physics
from cryofire.errors import ConfigError
from cryofire.model import (
    CryoFireModel,
    EncoderOutput,
    HalfPlaneLattice,
    ModelConfig,
    observed_spectrum,
    predict_spectrum,
    recentre,
    slice_coordinates,
)

BOX = 32
SIGMA_PX = 2.0
CENTRE_PX = torch.tensor([3.0, -2.0, 1.5])  # (x, y, z) from the box centre
NO_WINDOW = {"window_inner_fraction": 1.5, "window_outer_fraction": 1.6}


class GaussianBlobSpectrum(torch.nn.Module):
    """Exact decoder: the analytic FT / D of an off-centre Gaussian blob (ignores z)."""

    def forward(self, coords: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        k_sq = coords.square().sum(-1)
        peak = (2 * math.pi * SIGMA_PX**2) ** 1.5
        amplitude = peak * torch.exp(-2 * (math.pi * SIGMA_PX) ** 2 * k_sq)
        phase = -2 * math.pi * (coords @ CENTRE_PX)
        return torch.stack((amplitude * torch.cos(phase), amplitude * torch.sin(phase)), -1) / BOX


def blob_volume() -> torch.Tensor:
    """The same blob sampled on a (D, D, D) [z, y, x] grid, float64."""
    offsets = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    z, y, x = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    points = torch.stack((x, y, z), -1)
    return torch.exp(-(points - CENTRE_PX.double()).square().sum(-1) / (2 * SIGMA_PX**2))


def make_ctf(batch: int) -> torch.Tensor:
    """Astigmatic CTFs (B, D, D) at 3 Å/px."""
    return physics.ctf_for_images(
        BOX,
        torch.full((batch,), 3.0),
        defocus_u_angstrom=torch.linspace(8000, 15000, batch),
        defocus_v_angstrom=torch.linspace(7000, 14000, batch),
        defocus_angle_deg=torch.linspace(0, 90, batch),
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.1,
    )


def simulate(rotations: torch.Tensor, shifts_px: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Blob images (B, D, D): project, apply the CTF, put the particle at centre - shift."""
    projections = physics.project_volume(blob_volume(), rotations.double()).float()
    spectra = physics.fft2_centered(projections) * ctf
    return physics.ifft2_centered(physics.phase_shift_2d(spectra, -shifts_px)).real


def signal_power(model: CryoFireModel, images: torch.Tensor) -> torch.Tensor:
    """Mean squared spectrum of images (B, D, D) over the full disk, the scale of the losses."""
    count = model.lattice.count_within(BOX / 2)
    return observed_spectrum(images, model.lattice, count).square().sum(-1).mean()


def small_config(**overrides) -> ModelConfig:
    options = dict(
        box_size=BOX, zdim=4, encoder_channels=8, encoder_max_channels=16, encoder_hidden_dim=32,
        decoder_width=32, decoder_depth=1, num_fourier_features=16, planned_images=1000,
    )
    return ModelConfig(**(options | overrides))


def test_predicted_slices_match_projections_times_ctf() -> None:
    rotations = physics.random_rotations(4, generator=torch.Generator().manual_seed(1))
    ctf = make_ctf(4)
    projections = physics.project_volume(blob_volume(), rotations.double()).float()
    lattice = HalfPlaneLattice(BOX)
    count = lattice.count_within(BOX / 2)
    images = physics.ifft2_centered(physics.fft2_centered(projections) * ctf).real
    observed = observed_spectrum(images, lattice, count)
    ctf_values = lattice.gather(ctf, count)
    no_latent = torch.zeros(4, 1, 0)
    exact = GaussianBlobSpectrum()
    coords = lattice.coords[:count]
    predicted = predict_spectrum(exact, rotations[:, None], no_latent, coords, ctf_values)[:, 0]
    assert torch.allclose(predicted, observed, atol=0.01 * observed.abs().max())


@pytest.mark.parametrize("shift_px", [(0.0, 0.0), (2.0, -1.0), (-1.5, 2.5)])
def test_exact_decoder_explains_shifted_ctf_images(shift_px: tuple[float, float]) -> None:
    model = CryoFireModel(small_config(pose_mode="fixed", **NO_WINDOW))
    model.decoder = GaussianBlobSpectrum()
    rotations = physics.random_rotations(3, generator=torch.Generator().manual_seed(2))
    shifts = torch.tensor([shift_px] * 3)
    ctf = make_ctf(3)
    images = simulate(rotations, shifts, ctf)
    signal = signal_power(model, images)
    right = model(images, ctf, 10**9, rotations, shifts)["per_image_loss"]
    off_by_one_px = shifts + torch.tensor([1.0, 0.0])
    wrong = model(images, ctf, 10**9, rotations, off_by_one_px)["per_image_loss"]
    assert right.max() < 1e-3 * signal
    assert wrong.min() > 0.05 * signal


def _scripted_encoder(rotations: torch.Tensor, shifts_px: torch.Tensor, zdim: int):
    """An encoder stub: wrong poses for the originals, and for the mirrored copies the poses of
    the mirrored images, derived by hand: R -> diag(-1, 1, -1) R, (tx, ty) -> (-tx, ty)."""
    mirror_r = torch.diag(torch.tensor([-1.0, 1.0, -1.0])) @ rotations
    mirror_t = shifts_px * torch.tensor([-1.0, 1.0])

    def encode(images: torch.Tensor) -> EncoderOutput:
        batch = images.shape[0] // 2
        wrong_r = physics.random_rotations(batch, generator=torch.Generator().manual_seed(9))
        return EncoderOutput(
            rotations=torch.cat((wrong_r, mirror_r))[:, None],
            shifts_px=torch.cat((torch.zeros(batch, 2), mirror_t))[:, None],
            z_mean=torch.zeros(2 * batch, zdim),
            z_logvar=None,
        )

    return encode


def test_mirrored_path_wins_and_maps_back_to_the_true_pose() -> None:
    model = CryoFireModel(small_config(symmetric_loss=True, **NO_WINDOW))
    model.decoder = GaussianBlobSpectrum()
    rotations = physics.random_rotations(3, generator=torch.Generator().manual_seed(3))
    shifts = torch.tensor([[1.0, -2.0], [0.5, 0.5], [-2.0, 1.0]])
    ctf = make_ctf(3)
    model.encoder.forward = _scripted_encoder(rotations, shifts, zdim=4)
    images = simulate(rotations, shifts, ctf)
    out = model(images, ctf, 10**9)
    assert out["per_image_loss"].max() < 1e-3 * signal_power(model, images)
    assert out["mirrored"].all()
    assert torch.allclose(out["rotations"], rotations, atol=1e-5)
    assert torch.allclose(out["shifts_px"], shifts, atol=1e-5)
    assert physics.geodesic_distance_deg(out["rotations"], rotations).max() < 1e-2


def test_forward_shapes_and_gradients_reach_encoder_and_decoder() -> None:
    model = CryoFireModel(small_config(num_pose_heads=2, variational=True))
    images, ctf = torch.randn(5, BOX, BOX), make_ctf(5)
    out = model(images, ctf, images_seen=900)
    assert out["rotations"].shape == (5, 3, 3) and out["shifts_px"].shape == (5, 2)
    assert out["z"].shape == out["z_logvar"].shape == (5, 4)
    assert out["winner"].max() < 4 and out["loss"].ndim == 0 and out["kl"] > 0
    out["loss"].backward()
    encoder = model.encoder
    for module in (encoder.cnn, encoder.rotation_head, encoder.conformation_head, model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert model.decoder.feature_positions_px.grad is None


def test_class_targets_pull_the_first_latents_to_centred_one_hot_vectors() -> None:
    model = CryoFireModel(small_config())
    images, ctf = torch.randn(6, BOX, BOX), make_ctf(6)
    classes = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0, 1, 0]), 2)
    rotations = physics.random_rotations(6, generator=torch.Generator().manual_seed(0)).float()
    out = model(images, ctf, images_seen=900, target_rotations=rotations, target_shifts_px=torch.zeros(6, 2),
                target_classes=classes)
    expected = (out["z"][:, :2] - (classes - 0.5)).square().sum(-1).mean()
    assert torch.allclose(out["class_loss"], expected)
    out["class_loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.conformation_head.parameters())


def test_encode_returns_one_hypothesis_per_head_and_path() -> None:
    model = CryoFireModel(small_config(num_pose_heads=3))
    hypotheses = model.encode(torch.randn(2, BOX, BOX))
    assert hypotheses.rotations.shape == (2, 6, 3, 3) and hypotheses.z_mean.shape == (2, 6, 4)
    assert hypotheses.mirrored.tolist() == [False] * 3 + [True] * 3
    rotations = hypotheses.rotations
    identity = torch.eye(3).expand(2, 6, 3, 3)
    assert torch.allclose(rotations @ rotations.transpose(-1, -2), identity, atol=1e-5)


def test_latents_are_noise_during_the_pose_only_phase() -> None:
    model = CryoFireModel(small_config(zdim=6, pose_only_fraction=0.5, pose_only_z_std=2.0))
    images = torch.randn(64, BOX, BOX)
    early = model(images, None, images_seen=100)
    assert not torch.allclose(early["z_decoded"], early["z"])
    assert early["z_decoded"].std().item() == pytest.approx(2.0, rel=0.15)
    early["loss"].backward()
    assert all(p.grad is None for p in model.encoder.conformation_head.parameters())
    late = model(images[:4], None, images_seen=600)
    assert torch.equal(late["z_decoded"], late["z"])


def test_fixed_mode_uses_the_given_poses() -> None:
    model = CryoFireModel(small_config(pose_mode="fixed"))
    rotations = physics.random_rotations(4)
    shifts = torch.randn(4, 2)
    out = model(torch.randn(4, BOX, BOX), make_ctf(4), 500, rotations, shifts)
    assert torch.equal(out["rotations"], rotations) and torch.equal(out["shifts_px"], shifts)
    with pytest.raises(ValueError):
        model(torch.randn(4, BOX, BOX), None, 500)


def test_refine_mode_starts_at_the_given_poses() -> None:
    model = CryoFireModel(small_config(pose_mode="refine"))
    rotations = physics.random_rotations(4)
    shifts = torch.randn(4, 2)
    out = model(torch.randn(4, BOX, BOX), None, 500, rotations, shifts)
    assert torch.allclose(out["rotations"], rotations, atol=1e-6)
    assert torch.allclose(out["shifts_px"], shifts)
    out["loss"].backward()
    assert model.encoder.rotation_head.weight.grad.abs().sum() > 0


def test_frequency_marching_grows_the_fitted_disk() -> None:
    model = CryoFireModel(small_config(start_radius_px=3.0, marching_fraction=0.5))
    images = torch.randn(2, BOX, BOX)
    radii = [float(model(images, None, seen)["radius_px"]) for seen in (0, 250, 500, 900)]
    assert radii == pytest.approx([3.0, 3.0 + 13.0 / 2, 16.0, 16.0])


def test_forward_runs_under_bf16_autocast() -> None:
    model = CryoFireModel(small_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(3, BOX, BOX), make_ctf(3), 900)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert out["rotations"].dtype == torch.float32


def test_coordinates_and_phases_stay_float32_under_bf16_autocast() -> None:
    lattice = HalfPlaneLattice(BOX)
    coords = lattice.coords[: lattice.count_within(BOX / 2)]
    rotations = physics.random_rotations(3)[:, None]
    observed, shifts = torch.randn(3, coords.shape[0], 2), 5 * torch.randn(3, 2, 2)
    reference = (slice_coordinates(rotations, coords), recentre(observed, coords, shifts))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = (slice_coordinates(rotations, coords), recentre(observed, coords, shifts))
    for expected, got in zip(reference, autocast):
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_config_round_trips_and_rejects_unknown_options() -> None:
    config = small_config(pose_mode="refine", max_radius_px=10.0)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown"):
        ModelConfig.from_dict(config.to_dict() | {"lr": 1e-4})
    with pytest.raises(ConfigError):
        small_config(pose_mode="search")


def test_state_dict_and_config_rebuild_the_same_model() -> None:
    model = CryoFireModel(small_config(variational=True)).eval()
    rebuilt = CryoFireModel(ModelConfig.from_dict(model.config.to_dict())).eval()
    rebuilt.load_state_dict(model.state_dict())
    images = torch.randn(2, BOX, BOX)
    first, second = model(images, None, 900), rebuilt(images, None, 900)
    assert torch.equal(first["rotations"], second["rotations"])
    assert torch.equal(first["loss"], second["loss"])
