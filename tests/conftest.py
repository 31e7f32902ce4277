"""Tiny encoders built from transformers configs, saved to a temp dir and loaded back through the real
`from_pretrained` path. Nothing is ever downloaded: the Hub is switched to offline mode for the whole run."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
from helpers import build_tiny_encoders  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory):
    return build_tiny_encoders(str(tmp_path_factory.mktemp("encoders")))


@pytest.fixture(scope="session")
def dinov2_dir(tiny_encoders):
    return tiny_encoders["dinov2"][1]
