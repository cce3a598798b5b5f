import os

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


@pytest.fixture(params=["blas", "onednn"])
def cpu_gemm_backend(request):
    """Run a test with the CPU kernels' GEMMs on each backend (attnscale.ops.set_cpu_gemm), then restore."""
    from attnscale.ops import has_extension, set_cpu_gemm
    if not has_extension():
        pytest.skip("attnscale._C is not built")
    if request.param == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    prev = set_cpu_gemm(request.param)
    yield request.param
    set_cpu_gemm(prev)


def pytest_configure(config):
    # ATTNSCALE_DISABLE (attnscale.switches) would turn paths off under tests that compare them: the tests
    # choose their paths themselves
    os.environ.pop("ATTNSCALE_DISABLE", None)
