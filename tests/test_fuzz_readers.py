"""Fuzzing the STAR, MRC and .cs readers: a damaged or random file either reads or raises a CryofireError.

Each property starts from a small valid file (beside a valid 3-image stack, so that a STAR file that still parses is
also read through the image source), applies random edits, and reads the result. Any exception other than a
CryofireError subclass (a numpy, pandas or parser error escaping as a traceback) fails the test. The examples are
kept few (about 10 s in all) and written over the same file names, as a user fixing a file in place would.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from cryofire.errors import CryofireError
from cryofire.io import ImageSource, read_particles, read_stack_layout, read_volume, stack_pixel_size

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STAR_31 = """# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
1 opticsGroup1 2.5 8 300.0 2.7 0.1

data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnAngleRot #5
_rlnAngleTilt #6
_rlnAnglePsi #7
_rlnOpticsGroup #8
000001@s.mrcs 15000.0 14500.0 30.0 10.0 20.0 30.0 1
000002@s.mrcs 16000.0 15500.0 31.0 11.0 21.0 31.0 1
000003@s.mrcs 17000.0 16500.0 32.0 12.0 22.0 32.0 1
"""
STAR_30 = """data_

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
_rlnDetectorPixelSize #8
_rlnMagnification #9
1@s.mrcs 15000.0 14500.0 30.0 300 2.7 0.1 5.0 20000
2@s.mrcs 16000.0 15500.0 31.0 300 2.7 0.1 5.0 20000
3@s.mrcs 17000.0 16500.0 32.0 300 2.7 0.1 5.0 20000
"""
# Replacement tokens that reach the readers' checks: special numbers, bad image names, structure keywords.
TOKENS = ["nan", "inf", "-inf", "", "1e400", "-1", "0", "1.5", "99999999999999999999", '""', "'", '"a b"', "abc",
          "data_", "data_particles", "loop_", "_rlnImageName", "_rlnOpticsGroup", "#", "0@s.mrcs", "4@s.mrcs", "@@",
          "1@", "1@../x.mrcs", "1@/abs.mrcs", "1@t.mrcs", "2", "\x00", "\n"]
# int32 values written over MRC header words: zero, signs, extremes, real and unsupported modes, overflowing sizes.
HEADER_VALUES = [0, -1, 1, 2, 3, 4, 6, 12, 101, 1024, 2**21, 2**22, 2**31 - 1, -(2**31)]
N_HEADER_WORDS = 56  # the 224 bytes before the labels
MRC_HEADER_BYTES = 1024


def _write_mrc(path: Path, data: np.ndarray, stack: bool = True) -> bytes:
    """Write ``data`` with mrcfile (2.5 Å/px) and return the file's bytes."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if stack:
            mrc.set_image_stack()
        mrc.voxel_size = 2.5
    return path.read_bytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder with s.mrcs (3 images of 8 x 8 px, 2.5 Å/px) and t.mrcs (2 images of 10 x 10 px)."""
    folder = tmp_path_factory.mktemp("fuzz")
    _write_mrc(folder / "s.mrcs", np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32))
    _write_mrc(folder / "t.mrcs", np.ones((2, 10, 10), np.float32))
    return folder


def _reads_or_fails_cleanly(read: Callable[[], object]) -> None:
    """Run ``read``; a CryofireError is an acceptable outcome, any other exception propagates (fails the test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read()
        except CryofireError as error:
            event(f"{type(error).__name__}")  # the mix shows with --hypothesis-show-statistics
        else:
            event("read")


def _read_star_and_images(path: Path) -> None:
    table = read_particles(path)
    source = ImageSource(table)
    source[np.arange(len(source))]


def _edit_tokens(text: str, edits: list[tuple[int, str]]) -> str:
    """Replace the word at (index modulo the number of words) by the given token, for each edit."""
    parts = re.split(r"(\s+)", text)
    words = range(0, len(parts), 2)  # even positions hold the words, odd ones the white space between them
    for index, token in edits:
        parts[words[index % len(words)]] = token
    return "".join(parts)


@FUZZ
@given(base=st.sampled_from([STAR_31, STAR_30]),
       edits=st.lists(st.tuples(st.integers(0, 10**4), st.sampled_from(TOKENS) | st.text(max_size=6)),
                      min_size=1, max_size=4))
@example(base=STAR_30, edits=[(4, "_rlnImageName")])  # a label twice: the column reads as a table, not a series
def test_star_with_edited_words(folder, base, edits):
    path = folder / "edited.star"
    path.write_text(_edit_tokens(base, edits))
    _reads_or_fails_cleanly(lambda: _read_star_and_images(path))


@FUZZ
@given(base=st.sampled_from([STAR_31, STAR_30]), data=st.data())
def test_star_with_damaged_bytes(folder, base, data):
    content = bytearray(base.encode())
    content = content[:data.draw(st.just(len(content)) | st.integers(0, len(content)), label="truncate at")]
    for position, value in data.draw(st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), max_size=4),
                                     label="byte changes"):
        if content:
            content[position % len(content)] = value
    path = folder / "damaged.star"
    path.write_bytes(bytes(content))
    _reads_or_fails_cleanly(lambda: _read_star_and_images(path))


@FUZZ
@given(content=st.text(max_size=400) | st.binary(max_size=400).map(lambda raw: raw.decode("latin-1")))
def test_random_text_as_star(folder, content):
    path = folder / "random.star"
    path.write_text(content, encoding="utf-8", errors="surrogateescape")
    _reads_or_fails_cleanly(lambda: _read_star_and_images(path))


def _read_mrc_every_way(path: Path) -> None:
    """Read ``path`` as a stack (header, memory map, image source), and separately as a volume and a pixel size."""
    _reads_or_fails_cleanly(lambda: read_stack_layout(path).open().sum())
    table = pd.DataFrame({"image_path": [str(path)], "image_index": [0]})
    _reads_or_fails_cleanly(lambda: ImageSource(table)[[0]])
    _reads_or_fails_cleanly(lambda: read_volume(path))
    _reads_or_fails_cleanly(lambda: stack_pixel_size(path))


@pytest.fixture(scope="module")
def valid_mrc(folder) -> dict[str, bytes]:
    """The bytes of a 3-image 8 x 8 stack and of an 8^3 volume."""
    rng = np.random.default_rng(1)
    return {"stack": _write_mrc(folder / "valid.mrcs", rng.normal(size=(3, 8, 8)).astype(np.float32)),
            "volume": _write_mrc(folder / "valid.mrc", rng.normal(size=(8, 8, 8)).astype(np.float32), stack=False)}


@FUZZ
@given(kind=st.sampled_from(["stack", "volume"]),
       words=st.lists(st.tuples(st.integers(0, N_HEADER_WORDS - 1), st.sampled_from(HEADER_VALUES)),
                      min_size=1, max_size=3))
@example(kind="stack", words=[(0, 2**21), (1, 2**21), (2, 2**22)])  # nx * ny * nz = 2^64 wrapped to 0 in int64
def test_mrc_with_extreme_header_words(folder, valid_mrc, kind, words):
    content = bytearray(valid_mrc[kind])
    for word, value in words:
        content[4 * word:4 * word + 4] = np.int32(value).tobytes()
    path = folder / "header.mrc"
    path.write_bytes(bytes(content))
    _read_mrc_every_way(path)


@FUZZ
@given(kind=st.sampled_from(["stack", "volume"]), data=st.data())
def test_mrc_with_damaged_bytes(folder, valid_mrc, kind, data):
    content = bytearray(valid_mrc[kind])
    content = content[:data.draw(st.just(len(content)) | st.integers(0, len(content)), label="truncate at")]
    header_position = st.integers(0, MRC_HEADER_BYTES - 1)
    for position, value in data.draw(st.lists(st.tuples(header_position, st.integers(0, 255)), max_size=6),
                                     label="header byte changes"):
        if position < len(content):
            content[position] = value
    path = folder / "damaged.mrc"
    path.write_bytes(bytes(content))
    _read_mrc_every_way(path)


@FUZZ
@given(content=st.binary(max_size=2 * MRC_HEADER_BYTES))
def test_random_bytes_as_mrc(folder, content):
    path = folder / "random.mrc"
    path.write_bytes(content)
    _read_mrc_every_way(path)


@pytest.fixture(scope="module")
def valid_cs(fixtures_dir) -> bytes:
    return (fixtures_dir / "cryosparc_J2_particles_exported.cs").read_bytes()


@FUZZ
@given(data=st.data())
def test_cs_with_damaged_bytes(folder, valid_cs, data):
    content = bytearray(valid_cs)
    content = content[:data.draw(st.just(len(content)) | st.integers(0, len(content)), label="truncate at")]
    for position, value in data.draw(st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4),
                                     label="byte changes near the header"):
        if position < len(content):
            content[position] = value
    path = folder / "damaged.cs"
    path.write_bytes(bytes(content))
    _reads_or_fails_cleanly(lambda: read_particles(path, allow_absolute_paths=True))
