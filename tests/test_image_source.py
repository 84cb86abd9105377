"""The lazy image source: images from real stacks in the requested order, and the errors for bad stacks."""

import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryofire.errors import InputError
from cryofire.io import ImageSource, read_star, validate_table


def _stack_data(path):
    """The whole stack read by mrcfile (independent of the code under test); old headers lack a map ID."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data, dtype=np.float32)


def _write_stack(path, data):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
    return str(path)


def _table(locations):
    """A minimal table of (stack path, 0-based index) pairs."""
    return pd.DataFrame({"rlnImageName": [f"{index + 1:06d}@{path}" for path, index in locations],
                         "image_path": [str(path) for path, _ in locations],
                         "image_index": [index for _, index in locations]})


@pytest.mark.filterwarnings("ignore:.*no pixel size")
def test_toy_projections_in_requested_order(fixtures_dir):
    table = read_star(fixtures_dir / "toy_projections.star")
    source = ImageSource(table)
    assert (len(source), source.image_size) == (1000, 30)
    expected = _stack_data(fixtures_dir / "toy_projections.mrcs")
    rows = np.array([999, 3, 4, 5, 3, 0, 998, 500])  # unsorted, with a repeat and a contiguous run
    images = source[rows]
    assert images.dtype == np.float32 and images.shape == (8, 30, 30)
    np.testing.assert_array_equal(images, expected[rows])


@pytest.mark.filterwarnings("ignore:.*no pixel size")
def test_two_stacks_in_a_datadir(fixtures_dir):
    table = read_star(fixtures_dir / "toy_projections_dir.star", datadir=fixtures_dir / "toy_datadir")
    stacks = {name: _stack_data(fixtures_dir / "toy_datadir" / name) for name in ("toy_images_a.mrcs",
                                                                                  "toy_images_b.mrcs")}
    source = ImageSource(table, max_open_stacks=1)
    rows = np.arange(0, 1000, 37)
    assert table["image_path"].iloc[rows].nunique() == 2
    expected = [stacks[path.rsplit("/", 1)[1]][index]
                for path, index in zip(table["image_path"].iloc[rows], table["image_index"].iloc[rows])]
    np.testing.assert_array_equal(source[rows], np.array(expected))


def test_relion31_images_are_read(fixtures_dir):
    # the fixture README says this star points at a missing Extract/ stack; its rlnImageName in fact
    # names relion31.mrcs beside it (rlnImageOriginalName holds the Extract/ path)
    source = ImageSource(read_star(fixtures_dir / "relion31.star"))
    np.testing.assert_array_equal(source[[4, 0]], _stack_data(fixtures_dir / "relion31.mrcs")[[4, 0]])


def test_relion5_box_size_disagreeing_with_its_stacks(fixtures_dir):
    table = read_star(fixtures_dir / "relion5.star", datadir=fixtures_dir / "toy_datadir")
    with pytest.raises(InputError, match="images are 30 px, but rlnImageSize says 448 px"):
        ImageSource(table)


def test_iter_batches_covers_the_indices_in_order(tmp_path):
    data = np.arange(7 * 4 * 4, dtype=np.float32).reshape(7, 4, 4)
    stack = _write_stack(tmp_path / "s.mrcs", data)
    source = ImageSource(_table([(stack, i) for i in range(7)]))
    batches = list(source.iter_batches(3))
    assert [rows.tolist() for rows, _ in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    np.testing.assert_array_equal(np.concatenate([images for _, images in batches]), data)
    (rows, images), = source.iter_batches(5, indices=[6, 2])
    assert rows.tolist() == [6, 2]
    np.testing.assert_array_equal(images, data[[6, 2]])


def test_integer_stacks_become_float32_and_source_pickles_small(tmp_path):
    data = np.arange(3 * 8 * 8, dtype=np.int16).reshape(3, 8, 8)
    source = ImageSource(_table([(_write_stack(tmp_path / "s.mrcs", data), i) for i in (2, 0)]))
    source[[0, 1]]  # opens the memory map
    copy = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 10_000  # the memory maps are not pickled
    np.testing.assert_array_equal(copy[[0, 1]], data[[2, 0]].astype(np.float32))


def test_missing_stack_names_stack_and_particle(tmp_path, fixtures_dir):
    with pytest.raises(InputError, match=r"image stack not found \(first used by particle 000004@") as error:
        ImageSource(_table([(fixtures_dir / "relion31.mrcs", 0), (tmp_path / "absent.mrcs", 3)]))
    assert "absent.mrcs" in str(error.value) and "particle file row 2" in str(error.value)


def test_relion31_star_moved_away_from_its_stack(tmp_path, fixtures_dir):
    (tmp_path / "relion31.star").write_text((fixtures_dir / "relion31.star").read_text())
    table = read_star(tmp_path / "relion31.star")  # metadata alone reads fine
    with pytest.raises(InputError, match=r"relion31.mrcs: image stack not found \(first used by particle "
                                         r"000001@relion31.mrcs \(particle file row 1\)\)"):
        ImageSource(table)


def test_index_past_the_end_of_its_stack(tmp_path):
    stack = _write_stack(tmp_path / "s.mrcs", np.zeros((10, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"particle 000011@.*asks for image 11, but the stack holds 10 images"):
        ImageSource(_table([(stack, 0), (stack, 10)]))


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_pixels_name_count_and_particles(tmp_path):
    data = np.zeros((6, 8, 8), np.float32)
    data[2, 1, 1:4] = np.nan
    data[5, 0, 0] = np.inf
    source = ImageSource(_table([(_write_stack(tmp_path / "s.mrcs", data), i) for i in range(6)]))
    np.testing.assert_array_equal(source[[0, 1, 3]], 0)
    with pytest.raises(InputError, match=r"4 NaN or infinite pixels in 2 image\(s\): particle 000003@.*000006@"):
        source[np.arange(6)]
    unchecked = ImageSource(_table([(tmp_path / "s.mrcs", 2)]), check_finite=False)
    assert np.isnan(unchecked[[0]]).sum() == 3


def test_mismatched_box_sizes(tmp_path):
    small = _write_stack(tmp_path / "small.mrcs", np.zeros((2, 16, 16), np.float32))
    large = _write_stack(tmp_path / "large.mrcs", np.zeros((2, 20, 20), np.float32))
    with pytest.raises(InputError, match="images are 20 px but those of .*small.mrcs are 16 px"):
        ImageSource(_table([(small, 0), (large, 1)]))


def test_truncated_stack_is_caught_before_reading(tmp_path):
    stack = _write_stack(tmp_path / "s.mrcs", np.zeros((4, 8, 8), np.float32))
    with open(stack, "r+b") as stream:
        stream.truncate(1024 + 2 * 8 * 8 * 4)
    with pytest.raises(InputError, match="truncated"):
        ImageSource(_table([(stack, 0)]))


def test_validate_table(fixtures_dir):
    table = read_star(fixtures_dir / "relion31.star")
    validate_table(table, "relion31.star")
    with pytest.raises(InputError, match="no column rlnDefocusU"):
        validate_table(table.drop(columns="rlnDefocusU"), "relion31.star")
    with pytest.raises(InputError, match="column rlnVoltage has dtype"):
        validate_table(table.assign(rlnVoltage="300"), "relion31.star")
    with pytest.raises(InputError, match="has rlnAngleRot, rlnAngleTilt but not rlnAnglePsi"):
        validate_table(table.drop(columns="rlnAnglePsi"), "relion31.star")


def test_io_layer_does_not_import_torch():
    code = "import sys, cryofire.io; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
