import pytest
import torch

from attnscale.ops import has_cuda_kernels


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available() and has_cuda_kernels()
    skip = pytest.mark.skip(reason="needs a CUDA GPU and attnscale built with its CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
