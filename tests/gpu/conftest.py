"""What the GPU tests train: on CUDA a random SD1.5-architecture model (its real shapes, so that the offload
engine has its ~50 buckets and streamed blocks to overlap) and images at 512 px; the CPU dry runs of the
same tests take the tiny test model and 64 px images (tests/conftest.py). `GPU_CHECK_SD15` names a random
SD1.5 folder built already (bench/gpu_check.py builds one for all its rows)."""

import os
from pathlib import Path

import pytest
from support.cli_runs import random_sd15
from support.testing import make_image_folder


@pytest.fixture(scope="session")
def sd15(tmp_path_factory):
    if os.environ.get("GPU_CHECK_SD15"):
        return Path(os.environ["GPU_CHECK_SD15"])
    return random_sd15(tmp_path_factory.mktemp("random-sd15") / "model")


@pytest.fixture(scope="session")
def images_512(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images-512"), count=8, size=512)


@pytest.fixture
def model_and_data(request, device):
    """(model, images, resolution, device overrides) for `device`."""
    if device == "cuda":
        return request.getfixturevalue("sd15"), request.getfixturevalue("images_512"), 512, []
    return request.getfixturevalue("tiny_sd1"), request.getfixturevalue("images"), 64, ["memory.device=cpu"]

