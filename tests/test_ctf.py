"""The RELION CTF: wavelength, zeros, sign at DC, astigmatism, envelope."""

import math

import pytest
import torch

from cryofire.physics import compute_ctf, ctf_for_images, electron_wavelength_angstrom, frequency_grid_2d

F64 = torch.float64
BASE = dict(defocus_angle_deg=0.0, voltage_kv=300.0, cs_mm=0.0, amplitude_contrast=0.0)


def _along(direction_deg: float, s_per_angstrom: torch.Tensor) -> torch.Tensor:
    """Frequencies (N, 2) in 1/Å at radii ``s`` along a direction from the x axis."""
    angle = math.radians(direction_deg)
    return torch.stack((s_per_angstrom * math.cos(angle), s_per_angstrom * math.sin(angle)), dim=-1)


@pytest.mark.parametrize("voltage_kv, expected", [(300, 0.019687), (200, 0.025079), (100, 0.037014)])
def test_relativistic_electron_wavelength(voltage_kv, expected):
    assert electron_wavelength_angstrom(voltage_kv) == pytest.approx(expected, abs=2e-6)


def test_zeros_of_a_pure_defocus_ctf_are_where_predicted():
    defocus = 20000.0
    wavelength = electron_wavelength_angstrom(300.0)
    zeros = torch.sqrt(torch.arange(1, 6, dtype=F64) / (wavelength * defocus))
    freqs = _along(17.0, torch.cat([zeros, zeros * 0.99, zeros * 1.01]))
    ctf = compute_ctf(freqs, defocus, defocus, **BASE)
    assert torch.allclose(ctf[:5], torch.zeros(5, dtype=F64), atol=1e-9)
    assert torch.all(ctf[5:10] * ctf[10:] < 0)  # the sign flips across each zero
    s = torch.linspace(0, 0.2, 50, dtype=F64)
    expected = torch.sin(math.pi * wavelength * defocus * s**2)
    assert torch.allclose(compute_ctf(_along(0.0, s), defocus, defocus, **BASE), expected, atol=1e-12)


@pytest.mark.parametrize("amplitude_contrast", [0.07, 0.1, 0.3])
def test_ctf_is_plus_amplitude_contrast_at_dc(amplitude_contrast):
    ctf = ctf_for_images(32, 1.5, dtype=F64, defocus_u_angstrom=12000.0, defocus_v_angstrom=15000.0,
                         defocus_angle_deg=20.0, voltage_kv=300.0, cs_mm=2.7,
                         amplitude_contrast=amplitude_contrast, bfactor_angstrom2=50.0)
    assert ctf[16, 16].item() == pytest.approx(amplitude_contrast, abs=1e-12)


def test_phase_shift_of_90_degrees_makes_dc_one():
    ctf = compute_ctf(torch.zeros(1, 2, dtype=F64), 1e4, 1e4, **{**BASE, "phase_shift_deg": 90.0})
    assert ctf.item() == pytest.approx(1.0)


def test_astigmatism_defocus_u_lies_along_the_defocus_angle():
    s = torch.linspace(0.01, 0.3, 40, dtype=F64)
    params = dict(BASE, defocus_angle_deg=30.0, cs_mm=2.7, amplitude_contrast=0.1)
    astigmatic = lambda freqs: compute_ctf(freqs, 15000.0, 25000.0, **params)  # noqa: E731
    isotropic = lambda freqs, df: compute_ctf(freqs, df, df, **params)  # noqa: E731
    assert torch.allclose(astigmatic(_along(30.0, s)), isotropic(_along(30.0, s), 15000.0), atol=1e-12)
    assert torch.allclose(astigmatic(_along(120.0, s)), isotropic(_along(120.0, s), 25000.0), atol=1e-12)
    assert torch.allclose(astigmatic(_along(75.0, s)), isotropic(_along(75.0, s), 20000.0), atol=1e-12)


def test_spherical_aberration_and_bfactor_terms():
    s = torch.linspace(0, 0.4, 30, dtype=F64)
    wavelength = electron_wavelength_angstrom(300.0)
    cs_angstrom = 2.7e7
    params = dict(BASE, cs_mm=2.7, bfactor_angstrom2=80.0)
    ctf = compute_ctf(_along(0.0, s), 0.0, 0.0, **params)
    expected = -torch.sin(math.pi / 2 * cs_angstrom * wavelength**3 * s**4) * torch.exp(-80.0 * s**2 / 4)
    assert torch.allclose(ctf, expected, atol=1e-12)


def test_batched_parameters_and_per_image_pixel_size():
    defocus = torch.tensor([10000.0, 20000.0, 30000.0])
    pixel_size = torch.tensor([1.0, 2.0, 3.0])
    params = dict(defocus_u_angstrom=defocus, defocus_v_angstrom=defocus * 1.1, defocus_angle_deg=10.0,
                  voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    ctf = ctf_for_images(16, pixel_size, **params)
    assert ctf.shape == (3, 16, 16) and ctf.dtype == torch.float32
    freqs = frequency_grid_2d(16)
    for i in range(3):
        params_i = {k: (v[i] if torch.is_tensor(v) else v) for k, v in params.items()}
        one = compute_ctf(freqs / pixel_size[i], **params_i)
        assert torch.allclose(ctf[i], one, atol=1e-6)


def test_wavelength_is_right_in_float32():
    """The SI formula underflows in float32 (squared momentum ~1e-44); the result must not depend on precision."""
    wavelength32 = electron_wavelength_angstrom(torch.tensor(300.0, dtype=torch.float32))
    assert wavelength32.dtype == torch.float32
    assert abs(float(wavelength32) - 0.019687) < 2e-6
