"""Tiny encoders built from transformers configs, saved to a temp dir and loaded back through the real
`from_pretrained` path. Nothing is ever downloaded: the Hub is switched to offline mode for the whole run."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from hypothesis import HealthCheck, settings  # noqa: E402

# Property-based tests (tests/test_fuzz.py). "ci", the default: a few derandomized examples per property, so every
# run tries the same ones, quickly, and no example database is written. "thorough": 1000 random examples per
# property, with the database (.hypothesis/, which hypothesis gitignores itself); pick it with
# `pytest --hypothesis-profile=thorough` or HYPOTHESIS_PROFILE=thorough.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Training picks its CPU threads from the machine's load (stage1/base/cpu_threads.py); the tests compare runs made at
# different moments bit for bit, so they pin the count as a user would (OMP_NUM_THREADS), at torch's default.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
from helpers import build_tiny_encoders, tiny_vqrae  # noqa: E402
from torchvision.utils import save_image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory):
    return build_tiny_encoders(str(tmp_path_factory.mktemp("encoders")))


@pytest.fixture(scope="session")
def dinov2_dir(tiny_encoders):
    return tiny_encoders["dinov2"][1]


@pytest.fixture(scope="module")
def model_dir(dinov2_dir, tmp_path_factory):
    """A tiny VQRAE saved once per test module (seed 0), for the commands and loaders to read."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_vqrae(dinov2_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def train_images(tmp_path_factory):
    """Eight small structured images (smooth colour fields with an edge), some not square."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        coarse = torch.rand(1, 3, 4, 4, generator=g)
        image = torch.nn.functional.interpolate(coarse, size=(40, 48 if i % 2 else 40), mode="bilinear")[0]
        image[:, : 10 + i, :] *= 0.5
        os.makedirs(root / f"class{i % 2}", exist_ok=True)
        save_image(image, root / f"class{i % 2}" / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
    """An ImageFolder tree (two classes) and one image in the root, which has no class."""
    import numpy as np
    from helpers import smooth_images
    from PIL import Image

    root = tmp_path_factory.mktemp("tree")
    pixels = (smooth_images(4, size=40, seed=9).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for (folder, name), image in zip([("cat", "a.png"), ("cat", "b.png"), ("dog", "c.png"), (".", "root.png")],
                                     pixels, strict=True):
        (root / folder).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / folder / name)
    return str(root)
