"""MRC volumes and stacks: reading real and damaged files, atomic writing, chunked stack writing."""

import os

import mrcfile
import numpy as np
import pytest

from cryofire.errors import InputError
from cryofire.io import StackWriter, open_stack, read_stack_layout, read_volume, stack_pixel_size, write_volume


def _write_raw_stack(path, data, voxel_size=1.5):
    """A stack written by mrcfile itself (independent of the code under test)."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = voxel_size


def test_read_volume_matches_mrcfile(fixtures_dir):
    volume, voxel_size = read_volume(fixtures_dir / "hand-vol.mrc")
    assert volume.shape == (64, 64, 64) and volume.dtype == np.float32
    assert voxel_size == pytest.approx(1.0)
    np.testing.assert_array_equal(volume, mrcfile.read(fixtures_dir / "hand-vol.mrc"))


def test_read_volume_rejects_a_non_cubic_map(fixtures_dir):
    with pytest.raises(InputError, match="320x320x7 voxels, not cubic") as error:
        read_volume(fixtures_dir / "empiar_10076_7.mrc")
    assert "empiar_10076_7.mrc" in str(error.value)


def test_read_volume_accepts_a_header_without_map_id_or_voxel_size(tmp_path):
    path = tmp_path / "bare.mrc"
    volume = np.arange(8**3, dtype=np.float32).reshape(8, 8, 8)
    write_volume(path, volume, voxel_size_angstrom=2.0)
    with open(path, "r+b") as stream:  # zero the cell size (bytes 40-51) and the map ID (208-211)
        stream.seek(40)
        stream.write(bytes(12))
        stream.seek(208)
        stream.write(bytes(4))
    with pytest.warns(UserWarning) as warned:
        read, voxel_size = read_volume(path, fallback_voxel_size_angstrom=3.5)
    messages = " ".join(str(warning.message) for warning in warned)
    assert "map ID" in messages and "no voxel size" in messages
    assert voxel_size == 3.5
    np.testing.assert_array_equal(read, volume)


def test_read_volume_transposes_non_standard_axis_order(tmp_path):
    volume = np.random.default_rng(0).normal(size=(6, 6, 6)).astype(np.float32)  # [z, y, x]
    path = tmp_path / "xyz_swapped.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.ascontiguousarray(volume.transpose(2, 1, 0)))  # sections along x, columns along z
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 2, 1
        mrc.voxel_size = 1.0
    read, _ = read_volume(path)
    np.testing.assert_array_equal(read, volume)


def test_write_volume_round_trip_and_relion_origin(tmp_path):
    path = tmp_path / "map.mrc"
    volume = np.random.default_rng(1).normal(size=(10, 10, 10))
    write_volume(path, volume, voxel_size_angstrom=1.7)
    read, voxel_size = read_volume(path)
    np.testing.assert_allclose(read, volume.astype(np.float32))
    assert voxel_size == pytest.approx(1.7)
    with mrcfile.open(path) as mrc:
        assert tuple(mrc.header.origin.item()) == (0.0, 0.0, 0.0)
        assert (int(mrc.header.nxstart), int(mrc.header.nystart), int(mrc.header.nzstart)) == (0, 0, 0)
    assert mrcfile.validate(str(path))
    assert sorted(os.listdir(tmp_path)) == ["map.mrc"]  # no temporary file left


def test_write_volume_failure_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="cubic"):
        write_volume(tmp_path / "bad.mrc", np.zeros((4, 4, 5)), 1.0)
    assert os.listdir(tmp_path) == []


def test_open_stack_is_a_read_only_memory_map(fixtures_dir):
    stack = open_stack(fixtures_dir / "relion31.mrcs")
    assert stack.shape == (5, 256, 256)
    assert isinstance(stack, np.memmap) and not stack.flags.writeable
    with pytest.warns(RuntimeWarning), mrcfile.open(fixtures_dir / "relion31.mrcs", permissive=True) as mrc:
        np.testing.assert_array_equal(stack[3], mrc.data[3])  # this old header lacks the map ID


def test_open_stack_of_a_single_image(tmp_path):
    _write_raw_stack(tmp_path / "one.mrc", np.ones((1, 12, 12), np.float32))
    assert open_stack(tmp_path / "one.mrc").shape == (1, 12, 12)


def test_truncated_stack_is_reported(tmp_path):
    path = tmp_path / "cut.mrcs"
    _write_raw_stack(path, np.ones((4, 16, 16), np.float32))
    os.truncate(path, 1024 + 3 * 16 * 16 * 4 + 10)
    with pytest.raises(InputError, match="truncated") as error:
        open_stack(path)
    assert "cut.mrcs" in str(error.value)


def test_empty_stack_files_are_reported(tmp_path):
    (tmp_path / "zero_bytes.mrcs").write_bytes(b"")
    with pytest.raises(InputError, match="too short for an MRC header"):
        open_stack(tmp_path / "zero_bytes.mrcs")
    _write_raw_stack(tmp_path / "no_images.mrcs", np.ones((2, 8, 8), np.float32))
    with open(tmp_path / "no_images.mrcs", "r+b") as stream:  # nz = 0
        stream.seek(8)
        stream.write(np.int32(0).tobytes())
    with pytest.raises(InputError, match="empty data block"):
        read_stack_layout(tmp_path / "no_images.mrcs")


def test_unsupported_mode_and_non_square_images_are_reported(tmp_path):
    _write_raw_stack(tmp_path / "complex.mrcs", np.ones((2, 8, 8), np.complex64))
    with pytest.raises(InputError, match="mode 4 is not supported"):
        open_stack(tmp_path / "complex.mrcs")
    _write_raw_stack(tmp_path / "wide.mrcs", np.ones((2, 8, 10), np.float32))
    with pytest.raises(InputError, match="10x8 px, not square"):
        open_stack(tmp_path / "wide.mrcs")


def test_stack_pixel_size(tmp_path, fixtures_dir):
    _write_raw_stack(tmp_path / "s.mrcs", np.ones((2, 8, 8), np.float32), voxel_size=2.25)
    assert stack_pixel_size(tmp_path / "s.mrcs") == pytest.approx(2.25)
    assert stack_pixel_size(fixtures_dir / "empiar_10076_7.mrc") is None  # header leaves it unset


def test_stack_writer_streams_chunks_into_a_valid_stack(tmp_path):
    path = tmp_path / "out.mrcs"
    rng = np.random.default_rng(2)
    chunks = [rng.normal(3.0, 2.0, size=(n, 16, 16)) for n in (5, 1, 7)]
    with StackWriter(path, image_size=16, pixel_size_angstrom=1.3) as writer:
        for chunk in chunks:
            writer.write(chunk)
        assert not path.exists()  # only renamed into place on a clean exit
    everything = np.concatenate(chunks).astype(np.float32)
    assert mrcfile.validate(str(path))
    with mrcfile.open(path) as mrc:
        np.testing.assert_array_equal(mrc.data, everything)
        assert mrc.voxel_size.x == pytest.approx(1.3)
        assert mrc.header.dmean == pytest.approx(everything.mean(), rel=1e-5)
        assert mrc.header.rms == pytest.approx(everything.std(), rel=1e-5)
    layout = read_stack_layout(path)
    assert (layout.n_images, layout.box_px, layout.dtype, layout.data_offset_bytes) == (13, 16, np.dtype("<f4"), 1024)
    assert sorted(os.listdir(tmp_path)) == ["out.mrcs"]


def test_stack_writer_leaves_nothing_behind_on_error(tmp_path):
    path = tmp_path / "out.mrcs"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with StackWriter(path, image_size=8, pixel_size_angstrom=1.0) as writer:
            writer.write(np.zeros((2, 8, 8)))
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["out.mrcs"] and path.read_bytes() == b"previous"
    with pytest.raises(ValueError, match=r"shape \(n, 8, 8\)"):
        with StackWriter(tmp_path / "other.mrcs", image_size=8, pixel_size_angstrom=1.0) as writer:
            writer.write(np.zeros((2, 8, 9)))
    assert not (tmp_path / "other.mrcs").exists()
    with pytest.raises(ValueError, match="no images were written"):
        with StackWriter(tmp_path / "empty.mrcs", image_size=8, pixel_size_angstrom=1.0):
            pass
    assert sorted(os.listdir(tmp_path)) == ["out.mrcs"]
