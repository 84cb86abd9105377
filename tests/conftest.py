"""Shared fixtures: the real RELION/cryoSPARC files kept beside the checkout in ../shared."""

from pathlib import Path

import pytest

CRYO_FORMATS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "cryo-formats"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Folder of real cryo-EM format files (see its README); tests using it skip when it is absent."""
    if not CRYO_FORMATS_DIR.is_dir():
        pytest.skip(f"cryo-format fixtures not found at {CRYO_FORMATS_DIR} "
                    "(they live in ../shared/fixtures/cryo-formats beside the checkout)")
    return CRYO_FORMATS_DIR
