"""Preprocessing: Fourier-crop downsampling, normalisation, inversion, chunking, and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from cryofire import physics
from cryofire.errors import ConfigError, InputError
from cryofire.io import ImageSource, read_particles, stack_pixel_size
from cryofire.preprocess import ChunkTransform, PreprocessConfig, preprocess
from cryofire.simulate import SimulationConfig, simulate_dataset

BOX, SMALL = 32, 16
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
               "rlnAmplitudeContrast", "rlnPhaseShift", "rlnCtfBfactor")
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber")


@pytest.fixture(scope="module")
def raw_star(tmp_path_factory) -> Path:
    """40 simulated images, box 32, 5 Å/px, in two stacks."""
    config = SimulationConfig(n_images=40, box_size=BOX, snr=1.0, seed=11, images_per_stack=25)
    return simulate_dataset(config, tmp_path_factory.mktemp("raw"))


def _read(star: Path) -> tuple[pd.DataFrame, np.ndarray]:
    table = read_particles(star)
    return table, ImageSource(table)[np.arange(len(table))]


def _run(raw_star: Path, out: Path, **options) -> tuple[pd.DataFrame, np.ndarray]:
    return _read(preprocess(raw_star, out, PreprocessConfig(**options)))


def _fourier_crop_numpy(images: np.ndarray, size: int) -> np.ndarray:
    """Independent Fourier crop with numpy: keep the central size x size block of the centred spectrum."""
    full = images.shape[-1]
    spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1))), axes=(-2, -1))
    start = full // 2 - size // 2
    block = spectrum[:, start:start + size, start:start + size]
    cropped = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(block, axes=(-2, -1))), axes=(-2, -1)).real
    return cropped * (size / full) ** 2


def _background(size: int, fraction: float = 0.85) -> np.ndarray:
    """Pixels farther than fraction * size / 2 from the box centre size // 2."""
    offsets = np.arange(size) - size // 2
    return np.hypot(offsets[:, None], offsets[None, :]) > fraction * size / 2


def test_fourier_crop_scales_the_pixel_size_and_keeps_ctf_and_poses(raw_star, tmp_path):
    raw_table, raw = _read(raw_star)
    table, images = _run(raw_star, tmp_path, box_size=SMALL, normalize="none")
    assert images.shape == (40, SMALL, SMALL)
    np.testing.assert_allclose(images, _fourier_crop_numpy(raw.astype(np.float64), SMALL), atol=1e-4 * raw.std())
    np.testing.assert_allclose(images.mean(axis=(1, 2)), raw.mean(axis=(1, 2)), atol=1e-4 * raw.std())
    np.testing.assert_array_equal(table["rlnImagePixelSize"], raw_table["rlnImagePixelSize"] * BOX / SMALL)
    assert (table["rlnImageSize"] == SMALL).all()
    stacks = table["image_path"].unique()
    assert all(stack_pixel_size(stack) == pytest.approx(10.0) for stack in stacks)
    for column in (*CTF_COLUMNS, *POSE_COLUMNS):  # origins stay in Å: the physical offset does not change
        np.testing.assert_array_equal(table[column], raw_table[column], err_msg=column)


def test_new_pixel_size_puts_the_ctf_at_the_same_physical_frequencies(raw_star, tmp_path):
    """The CTF on the small lattice at the new pixel size is the central block of the CTF on the large one."""
    table, _ = _run(raw_star, tmp_path, box_size=SMALL, normalize="none")
    raw_table = read_particles(raw_star)

    def ctf(rows: pd.DataFrame, size: int) -> torch.Tensor:
        column = lambda name: torch.tensor(rows[name].to_numpy(np.float64))  # noqa: E731
        return physics.ctf_for_images(
            size, column("rlnImagePixelSize"), defocus_u_angstrom=column("rlnDefocusU"),
            defocus_v_angstrom=column("rlnDefocusV"), defocus_angle_deg=column("rlnDefocusAngle"),
            voltage_kv=column("rlnVoltage"), cs_mm=column("rlnSphericalAberration"),
            amplitude_contrast=column("rlnAmplitudeContrast"))

    start = BOX // 2 - SMALL // 2
    expected = ctf(raw_table, BOX)[:, start:start + SMALL, start:start + SMALL]
    torch.testing.assert_close(ctf(table, SMALL), expected, rtol=0, atol=1e-9)


def test_background_normalisation_gives_zero_mean_unit_std_outside_the_mask(raw_star, tmp_path):
    _, images = _run(raw_star, tmp_path, box_size=SMALL, normalize="background", mask_radius_fraction=0.85)
    ring = images[:, _background(SMALL)].astype(np.float64)
    np.testing.assert_allclose(ring.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(ring.std(axis=1, ddof=1), 1.0, atol=1e-5)
    assert np.abs(images[:, ~_background(SMALL)].mean()) > 0.0  # the particle is not forced to zero mean


def test_dataset_normalisation_is_one_affine_map_for_all_images(raw_star, tmp_path):
    _, plain = _run(raw_star, tmp_path / "none", box_size=SMALL, normalize="none")
    _, images = _run(raw_star, tmp_path / "dataset", box_size=SMALL, normalize="dataset")
    plain = plain.astype(np.float64)
    assert images.mean(dtype=np.float64) == pytest.approx(0.0, abs=1e-5)
    assert images.std(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(images, (plain - plain.mean()) / plain.std(), atol=1e-4)


@pytest.mark.parametrize("normalize", ["none", "background"])
def test_invert_flips_the_sign(raw_star, tmp_path, normalize):
    _, upright = _run(raw_star, tmp_path / "upright", box_size=SMALL, normalize=normalize)
    _, inverted = _run(raw_star, tmp_path / "inverted", box_size=SMALL, normalize=normalize, invert=True)
    np.testing.assert_allclose(inverted, -upright, rtol=0, atol=1e-6)
    assert np.abs(upright).max() > 0.1


@pytest.mark.parametrize("normalize", ["background", "dataset"])
def test_chunk_size_does_not_change_the_output(raw_star, tmp_path, normalize):
    _, small_chunks = _run(raw_star, tmp_path / "c7", box_size=SMALL, normalize=normalize, chunk_size=7)
    _, one_chunk = _run(raw_star, tmp_path / "c1000", box_size=SMALL, normalize=normalize, chunk_size=1000)
    np.testing.assert_array_equal(small_chunks, one_chunk)


def test_output_is_readable_and_keeps_the_input_box_by_default(raw_star, tmp_path):
    star = preprocess(raw_star, tmp_path, PreprocessConfig(images_per_stack=15))
    assert star == tmp_path / "particles.star"
    table, images = _read(star)
    assert images.shape == (40, BOX, BOX) and images.dtype == np.float32 and np.isfinite(images).all()
    assert table["image_path"].nunique() == 3  # 15 + 15 + 10
    np.testing.assert_array_equal(table["rlnImagePixelSize"], 5.0)


def test_constant_image_is_an_input_error_naming_the_particle(raw_star, tmp_path):
    shutil.copytree(raw_star.parent, tmp_path / "raw")
    with mrcfile.open(tmp_path / "raw" / "stacks" / "particles_0000.mrcs", "r+") as stack:
        stack.data[4] = 3.0  # particle row 5
    star = tmp_path / "raw" / "particles.star"
    with pytest.raises(InputError, match=r"zero variance.*row\(s\) 5\b") as error:
        preprocess(star, tmp_path / "out", PreprocessConfig(box_size=SMALL))
    assert error.value.path == str(star)


@pytest.mark.parametrize("options, key", [
    ({"normalize": "median"}, "--normalize"),
    ({"box_size": 15}, "--box"),
    ({"box_size": 6}, "--box"),
    ({"mask_radius_fraction": 0.05}, "--mask-radius"),
])
def test_bad_options_are_config_errors(options, key):
    with pytest.raises(ConfigError, match=key):
        PreprocessConfig(**options)


def test_upsampling_is_a_config_error(raw_star, tmp_path):
    with pytest.raises(ConfigError, match="--box 64"):
        preprocess(raw_star, tmp_path, PreprocessConfig(box_size=64))


def test_constant_image_left_with_rounding_noise_by_the_fourier_crop_is_caught():
    # 100 -> 64 px leaves a background std of ~1e-7 x the mean: dividing by it would amplify rounding noise
    transform = ChunkTransform(PreprocessConfig(box_size=64), 100, "p.star")
    images = np.full((3, 100, 100), 3.3, np.float32)
    images[1] = np.random.default_rng(0).normal(size=(100, 100))
    with pytest.raises(InputError, match=r"p.star: 2 image\(s\) have a constant background \(zero variance\), "
                                         r"e.g. particle row\(s\) 8, 10"):
        transform(images, np.array([7, 8, 9]))


def _damaged_copy(raw_star: Path, folder: Path) -> Path:
    """A copy of the raw dataset whose particle row 5 is constant and row 31 holds a NaN pixel."""
    shutil.copytree(raw_star.parent, folder)
    with mrcfile.open(folder / "stacks" / "particles_0000.mrcs", "r+") as stack:
        stack.data[4] = 3.0
    with mrcfile.open(folder / "stacks" / "particles_0001.mrcs", "r+") as stack:
        stack.data[5, 2, 3] = np.nan
    return folder / "particles.star"


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_skip_bad_images_leaves_out_nan_and_constant_images(raw_star, tmp_path, caplog):
    star = _damaged_copy(raw_star, tmp_path / "raw")
    with pytest.raises(InputError, match=r"1 NaN or infinite pixels in 1 image\(s\): particle 000006@.*--skip-bad"):
        preprocess(star, tmp_path / "stopped", PreprocessConfig(box_size=SMALL))
    assert not list((tmp_path / "stopped" / "stacks").glob("*.mrcs"))
    with caplog.at_level("WARNING"):
        table, images = _run(star, tmp_path / "out", box_size=SMALL, skip_bad_images=True)
    assert f"{star}: leaving out 2 image(s) with NaN or infinite pixels or a constant background: particle row(s) " \
           "5, 31" in caplog.text
    kept = np.delete(np.arange(40), [4, 30])
    np.testing.assert_array_equal(table["rlnDefocusU"], read_particles(star)["rlnDefocusU"].to_numpy()[kept])
    assert images.shape == (38, SMALL, SMALL) and np.isfinite(images).all()


def test_skip_bad_images_with_nothing_left(raw_star, tmp_path):
    shutil.copytree(raw_star.parent, tmp_path / "raw")
    for stack in (tmp_path / "raw" / "stacks").glob("*.mrcs"):
        with mrcfile.open(stack, "r+") as mrc:
            mrc.data[:] = 1.0
    with pytest.raises(InputError, match="all 40 images have NaN or infinite pixels or a constant background"):
        preprocess(tmp_path / "raw" / "particles.star", tmp_path / "out", PreprocessConfig(skip_bad_images=True))
