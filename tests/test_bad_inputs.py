"""Bad inputs not pinned elsewhere (see docs/errors.md for the whole catalogue): each gives a CryofireError whose
one-line message names the file, the place and the remedy, and leaves no output behind."""

from __future__ import annotations

import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from numpy.lib import recfunctions

from cryofire.cli import main
from cryofire.errors import ConfigError, CryofireError, InputError
from cryofire.io import read_cs, read_stack_layout, read_star, read_volume
from cryofire.stacks import write_stacks
from cryofire.train import TrainConfig
from cryofire.train.checkpoint import load_checkpoint

RELION30 = """data_

loop_
_rlnImageName
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnImagePixelSize
_rlnImageSize
{rows}
"""
ROW = "{index}@s.mrcs 15000.0 14500.0 30.0 300 2.7 0.1 2.5 8"


def _star(path: Path, rows: list[str] | None = None, header: str = RELION30) -> Path:
    path.write_text(header.format(rows="\n".join(rows or [ROW.format(index=i) for i in (1, 2)])))
    return path


def _stack_with_header_words(path: Path, words: dict[int, int]) -> Path:
    """A valid 3-image 8 x 8 float32 stack whose int32 header words ``{index: value}`` are then overwritten."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.zeros((3, 8, 8), np.float32))
        mrc.set_image_stack()
    with open(path, "r+b") as stream:
        for word, value in words.items():
            stream.seek(4 * word)
            stream.write(np.int32(value).tobytes())
    return path


def test_header_sizes_whose_product_overflows_int64_are_reported_as_truncated(tmp_path):
    # nx * ny * nz = 2^64: in int64 arithmetic the declared size wrapped to 0 bytes and the file passed the check
    path = _stack_with_header_words(tmp_path / "huge.mrcs", {0: 2**21, 1: 2**21, 2: 2**22})
    with pytest.raises(InputError, match=r"file is truncated: 1792 bytes, but its header declares 4194304 sections "
                                         r"of 2097152x2097152 \(mode 2\), 73786976294838207488 bytes"):
        read_stack_layout(path)


@pytest.mark.parametrize("words, message", [
    ({0: -8}, r"the header declares an empty data block \(nx, ny, nz = -8, 8, 3\)"),
    ({23: -4}, r"not a readable MRC file \(negative count\) \(its header is damaged: re-copy or re-export"),
    ({3: 101}, r"MRC mode 101 is not supported"),
])
def test_corrupt_header_fields(tmp_path, words, message):
    with pytest.raises(InputError, match=message) as error:
        read_stack_layout(_stack_with_header_words(tmp_path / "bad.mrcs", words))
    assert str(tmp_path / "bad.mrcs") in str(error.value)


@pytest.mark.parametrize("text", ["hello world\nthis is not a STAR file\n", "", "\x00\x01garbage"])
def test_text_without_a_particle_block(tmp_path, text):
    (tmp_path / "p.star").write_text(text)
    with pytest.raises(InputError, match="no data block with an rlnImageName column"):
        read_star(tmp_path / "p.star")


def test_row_with_more_values_than_labels(tmp_path):
    path = _star(tmp_path / "p.star", [ROW.format(index=1), ROW.format(index=2) + " 7"])
    with pytest.raises(InputError, match=r"not a readable STAR file \(ParserError: .*Expected 9 fields in line 2, "
                                         r"saw 10\) \(each row of a loop_ needs one value per label"):
        read_star(path)


def test_repeated_column_label(tmp_path):
    header = RELION30.replace("_rlnDefocusV\n", "_rlnDefocusV\n_rlnDefocusU\n")
    path = _star(tmp_path / "p.star", [ROW.format(index=1).replace(" 30.0", " 15000.0 30.0")], header=header)
    with pytest.raises(InputError, match="data_ has column rlnDefocusU twice"):
        read_star(path)


@pytest.mark.parametrize("size, shown", [("8.5", "8.5"), ("1e30", "1e+30")])
def test_image_size_must_be_a_whole_number(tmp_path, size, shown):
    path = _star(tmp_path / "p.star", [ROW.format(index=1), ROW.format(index=2)[:-1] + size])
    with pytest.raises(InputError, match=re.escape(f"column rlnImageSize: data_ row 2 holds {shown}, not a whole")):
        read_star(path)


def test_nan_is_shown_plainly(tmp_path):
    path = _star(tmp_path / "p.star", [ROW.format(index=1).replace("15000.0", "nan")])
    with pytest.raises(InputError, match=r"column rlnDefocusU: data_ row 1 holds nan, not a finite number"):
        read_star(path)


def test_a_star_file_repaired_in_place_is_read_afresh(tmp_path):
    # starfile reads lines through linecache and left them cached after a parse error: the repaired file failed too
    path = _star(tmp_path / "p.star", [ROW.format(index=1), ROW.format(index=2) + " 7"])
    with pytest.raises(InputError):
        read_star(path)
    _star(path)
    assert len(read_star(path)) == 2


@pytest.fixture
def cs_particles(fixtures_dir) -> np.ndarray:
    return np.load(fixtures_dir / "cryosparc_J2_particles_exported.cs")


def _save_cs(path: Path, particles: np.ndarray) -> Path:
    with open(path, "wb") as stream:
        np.save(stream, particles)
    return path


def test_cs_with_a_damaged_header(fixtures_dir, tmp_path):
    content = bytearray((fixtures_dir / "cryosparc_J2_particles_exported.cs").read_bytes())
    content[content.index(b"}")] = ord("(")  # the header dictionary is no longer closed
    (tmp_path / "p.cs").write_bytes(bytes(content))
    with pytest.raises(InputError, match=r"p.cs: not a readable cryoSPARC .cs file \(TokenError"):
        read_cs(tmp_path / "p.cs")


def test_cs_blob_path_that_is_not_utf8(cs_particles, tmp_path):
    cs_particles["blob/path"][3] = b"\xff\xfe.mrcs"
    with pytest.raises(InputError, match=r"field blob/path: particle row 4 holds b'\\xff\\xfe.mrcs', not UTF-8"):
        read_cs(_save_cs(tmp_path / "p.cs", cs_particles))


def test_cs_field_of_the_wrong_type(cs_particles, tmp_path):
    index = cs_particles["blob/idx"].astype(np.float64) + 0.5
    particles = recfunctions.drop_fields(cs_particles, ["blob/idx"], usemask=False)
    particles = recfunctions.append_fields(particles, "blob/idx", index, usemask=False)
    with pytest.raises(InputError, match="field blob/idx holds float64 values, not integers"):
        read_cs(_save_cs(tmp_path / "p.cs", particles))


def test_cs_nan_in_an_optics_field_is_named(cs_particles, tmp_path):
    cs_particles["blob/psize_A"][5] = np.nan
    with pytest.raises(InputError, match="column rlnImagePixelSize: particle row 6 holds nan, not a finite number"):
        read_cs(_save_cs(tmp_path / "p.cs", cs_particles), allow_absolute_paths=True)


DiskUsage = namedtuple("DiskUsage", "total used free")


def _full_disk(free_bytes: int):
    return lambda folder: DiskUsage(10**12, 10**12 - free_bytes, free_bytes)


def test_stacks_need_the_disk_space_for_what_is_left_to_write(tmp_path, monkeypatch):
    images = lambda indices: np.zeros((len(indices), 8, 8), np.float32)  # noqa: E731
    needed = 2 * 1024 + 5 * 8 * 8 * 4  # two stacks (header + pixels)
    monkeypatch.setattr(shutil, "disk_usage", _full_disk(needed - 1))
    message = (rf"not enough disk space for 2 image stack\(s\) holding 5 images of 8x8 px: "
               rf"{needed / 1000:.3g} kB needed, {(needed - 1) / 1000:.3g} kB free")
    with pytest.raises(CryofireError, match=message):
        write_stacks(tmp_path, "p", 5, 8, 1.0, images, {"run": 1}, images_per_stack=3)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(shutil, "disk_usage", _full_disk(needed))
    write_stacks(tmp_path, "p", 5, 8, 1.0, images, {"run": 1}, images_per_stack=3)
    monkeypatch.setattr(shutil, "disk_usage", _full_disk(0))
    write_stacks(tmp_path, "p", 5, 8, 1.0, images, {"run": 1}, images_per_stack=3)  # all written: nothing to check


def test_full_disk_is_a_one_line_error_of_simulate(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", _full_disk(5 * 10**6))
    assert main(["simulate", "-o", str(tmp_path / "sim"), "-n", "10000", "--box", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"cryofire: error: {tmp_path / 'sim' / 'stacks'}: not enough disk space for 1 image stack(s) "
                   "holding 10000 images of 64x64 px: 164 MB needed, 5 MB free (free some space or write to "
                   "another folder)")


@pytest.mark.parametrize("argv, message", [
    (["preprocess", "p.star", "-o", "out", "--chunk-size", "0"], "--chunk-size must be at least 1, not 0"),
    (["preprocess", "p.star", "-o", "out", "--images-per-stack", "0"], "--images-per-stack must be at least 1, not 0"),
    (["simulate", "-o", "out", "--images-per-stack", "0"], "invalid simulation setting(s): images_per_stack"),
    (["backproject", "p.star", "-o", "v.mrc", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["backproject", "p.star", "-o", "v.mrc", "--max-images", "0"], "--max-images must be at least 1, not 0"),
])
def test_zero_sizes_are_option_errors_not_tracebacks(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # checked before any file is read or written
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().startswith(f"cryofire: error: {message}")
    assert os.listdir(tmp_path) == []


def test_invalid_axis_order_is_read_as_xyz_with_a_warning(tmp_path):
    volume = np.arange(4**3, dtype=np.float32).reshape(4, 4, 4)
    with mrcfile.new(tmp_path / "v.mrc") as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = 1.0
        mrc.header.mapc = 7
    with pytest.warns(UserWarning, match=r"invalid axis order \(mapc, mapr, maps\) = \(7, 2, 3\); assuming x, y, z"):
        read, _ = read_volume(tmp_path / "v.mrc")
    np.testing.assert_array_equal(read, volume)


def test_training_option_out_of_range_is_named():
    with pytest.raises(ConfigError, match=r"invalid training option\(s\): epochs, val_fraction \(see `cryofire train"):
        TrainConfig(epochs=0, val_fraction=0.9)


def test_damaged_checkpoint_is_an_input_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(InputError, match="checkpoint.pt: not a readable cryofire checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_damaged_stack_manifest_makes_every_stack_be_written_again(tmp_path):
    written = []

    def images(indices: np.ndarray) -> np.ndarray:
        written.extend(indices.tolist())
        return np.zeros((len(indices), 8, 8), np.float32)

    write_stacks(tmp_path, "p", 4, 8, 1.0, images, {"run": 1}, images_per_stack=2)
    write_stacks(tmp_path, "p", 4, 8, 1.0, images, {"run": 1}, images_per_stack=2)  # complete: nothing rewritten
    (tmp_path / "p_stacks.json").write_text('{"fingerprint": {"ru')  # cut short
    write_stacks(tmp_path, "p", 4, 8, 1.0, images, {"run": 1}, images_per_stack=2)
    assert written == [0, 1, 2, 3, 0, 1, 2, 3]
