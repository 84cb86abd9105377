"""The contrast transfer function, RELION's formula and sign (docs/conventions.md).

``CTF(s) = -sin(chi(s)) * exp(-B s^2 / 4)`` with
``chi = -pi lambda df(theta) s^2 + pi/2 Cs lambda^3 s^4 - phase_shift - atan(w / sqrt(1 - w^2))``,
so the CTF is ``+w`` at zero frequency. Per-particle parameters are tensors (B,) or scalars;
frequencies are in cycles per Ångström.
"""

from __future__ import annotations

import math

import torch

from cryofire.physics.lattice import frequency_grid_2d

_PLANCK_J_S = 6.62607015e-34
_ELECTRON_MASS_KG = 9.1093837015e-31
_ELEMENTARY_CHARGE_C = 1.602176634e-19
_LIGHT_SPEED_M_S = 299792458.0
_MM_TO_ANGSTROM = 1e7

Parameter = torch.Tensor | float


_HC_EV_ANGSTROM = _PLANCK_J_S * _LIGHT_SPEED_M_S / _ELEMENTARY_CHARGE_C * 1e10  # 12398.42 eV Å
_REST_ENERGY_EV = _ELECTRON_MASS_KG * _LIGHT_SPEED_M_S**2 / _ELEMENTARY_CHARGE_C  # 510998.95 eV


def electron_wavelength_angstrom(voltage_kv: Parameter) -> Parameter:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV.

    0.01969 Å at 300 kV; works elementwise on tensors. Computed in electronvolts, ``hc / sqrt(E (E + 2 m c^2))``,
    so that float32 tensors stay in range (in SI units the squared momentum, ~1e-44, is subnormal in float32).
    """
    energy_ev = voltage_kv * 1e3
    return _HC_EV_ANGSTROM / (energy_ev * (energy_ev + 2 * _REST_ENERGY_EV)) ** 0.5


def _per_image(value: Parameter, like: torch.Tensor) -> torch.Tensor:
    """A (B,) parameter as (B, 1, 1), which broadcasts against (D, D) grids; scalars stay 0-d."""
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return tensor[..., None, None] if tensor.dim() > 0 else tensor


def compute_ctf(
    freqs_per_angstrom: torch.Tensor,
    defocus_u_angstrom: Parameter,
    defocus_v_angstrom: Parameter,
    defocus_angle_deg: Parameter,
    voltage_kv: Parameter,
    cs_mm: Parameter,
    amplitude_contrast: Parameter,
    phase_shift_deg: Parameter = 0.0,
    bfactor_angstrom2: Parameter = 0.0,
) -> torch.Tensor:
    """CTF values on a frequency grid.

    Args:
        freqs_per_angstrom: (..., D, D, 2) frequencies (kx, ky) in 1/Å, e.g. (D, D, 2) shared by
            the batch or (B, D, D, 2) per image.
        defocus_u_angstrom, defocus_v_angstrom: defocus (Å, positive = underfocus), (B,) or scalar.
        defocus_angle_deg: angle of the U axis from the x axis (degrees).
        voltage_kv: acceleration voltage (kV). cs_mm: spherical aberration (mm).
        amplitude_contrast: fraction w in [0, 1). phase_shift_deg: phase plate shift (degrees).
        bfactor_angstrom2: envelope B-factor (Å^2).

    Returns:
        (B, D, D) (the broadcast shape of the parameters and the grid), in the grid's dtype.
    """
    kx, ky = freqs_per_angstrom[..., 0], freqs_per_angstrom[..., 1]
    s_sq = kx * kx + ky * ky
    theta = torch.atan2(ky, kx)
    like = freqs_per_angstrom
    df_u, df_v = _per_image(defocus_u_angstrom, like), _per_image(defocus_v_angstrom, like)
    angle = torch.deg2rad(_per_image(defocus_angle_deg, like))
    defocus = (df_u + df_v) / 2 + (df_u - df_v) / 2 * torch.cos(2 * (theta - angle))
    wavelength = electron_wavelength_angstrom(_per_image(voltage_kv, like))
    cs_angstrom = _per_image(cs_mm, like) * _MM_TO_ANGSTROM
    w = _per_image(amplitude_contrast, like)
    chi = (
        -math.pi * wavelength * defocus * s_sq
        + math.pi / 2 * cs_angstrom * wavelength**3 * s_sq**2
        - torch.deg2rad(_per_image(phase_shift_deg, like))
        - torch.atan(w / torch.sqrt(1 - w * w))
    )
    envelope = torch.exp(-_per_image(bfactor_angstrom2, like) * s_sq / 4)
    return -torch.sin(chi) * envelope


def ctf_for_images(
    size: int,
    pixel_size_angstrom: Parameter,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **params: Parameter,
) -> torch.Tensor:
    """CTF on the centred (D, D) Fourier lattice of images with the given pixel size (Å).

    ``pixel_size_angstrom`` is (B,) or a scalar; ``params`` are the keyword arguments of
    :func:`compute_ctf` (``defocus_u_angstrom``, ...). Returns (B, D, D) (or (D, D) when every
    parameter is a scalar).
    """
    freqs_px = frequency_grid_2d(size, device=device, dtype=dtype)
    pixel_size = torch.as_tensor(pixel_size_angstrom, dtype=freqs_px.dtype, device=freqs_px.device)
    freqs_per_angstrom = freqs_px / pixel_size[..., None, None, None]
    return compute_ctf(freqs_per_angstrom, **params)


def ctf_from_parameters(parameters: torch.Tensor, size: int) -> torch.Tensor:
    """CTF images (B, D, D) float32 from parameter rows (B, 9), computed in float64 on the rows' device.

    Row order: pixel size (Å), defocus U and V (Å), astigmatism angle (deg), voltage (kV), Cs (mm), amplitude
    contrast, phase shift (deg), B-factor (Å^2) -- the RELION columns of ``cryofire.train.data.CTF_PARAMETER_COLUMNS``.
    """
    p = parameters.double()
    ctf = ctf_for_images(
        size, p[:, 0], device=parameters.device, dtype=torch.float64,
        defocus_u_angstrom=p[:, 1], defocus_v_angstrom=p[:, 2], defocus_angle_deg=p[:, 3], voltage_kv=p[:, 4],
        cs_mm=p[:, 5], amplitude_contrast=p[:, 6], phase_shift_deg=p[:, 7], bfactor_angstrom2=p[:, 8],
    )
    return ctf.float()
