"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """The Hugging Face directory of the real pretrained SmolLM2-135M-Instruct (fp32), built and
    cached by tools/fetch_smollm2.py on first use. A failure to fetch it fails the test."""
    spec = importlib.util.spec_from_file_location(
        "megashear_fetch_smollm2", ROOT / "tools" / "fetch_smollm2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ensure_smollm2()
