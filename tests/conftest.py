"""Shared fixtures: tiny SD 1.x / 2.x pipelines and an image folder, built once per test session.

Every test runs offline on one CPU thread (a tiny UNet step takes ~0.04 s with one thread on a 2-core
machine and seconds with two).
"""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sdtune-test-cache-")  # the default caches (scan, latents)
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)  # not one folder left per session
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from support.testing import make_image_folder, save_tiny_pipeline, save_tiny_sdxl_pipeline  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1") / "model", version=1)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2") / "model", version=2)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), count=6)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: "slow" not in item.keywords)  # the long ones first: two workers finish together
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker: item.keywords also holds the folder name tests/gpu
            item.add_marker(skip)
