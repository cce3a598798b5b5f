"""attnscale.ops.caffe_interp (DeepLab Interp forward, CPU): bit-identical to the index_select path of
attnscale.caffe.interp (which it serves when no gradient is needed) over zooms, shrinks, equal sizes, size-1
axes and Caffe's cropping, the dispatch inside interp, and its input checks."""
import pytest
import torch

from attnscale import caffe
from attnscale.ops import has_extension
from attnscale.ops.interp import caffe_interp, caffe_interp_applies

pytestmark = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")

SIZES = [1, 2, 3, 5, 8, 21, 31, 33, 41, 49, 65]


def grad_path(x, size):
    """caffe.interp through its differentiable index_select path (x requires grad)."""
    return caffe.interp(x.clone().requires_grad_(), size).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_index_select_path(dtype):
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for hin in SIZES:
        for hout in SIZES:
            win, wout = SIZES[(SIZES.index(hin) + 3) % len(SIZES)], SIZES[(SIZES.index(hout) + 5) % len(SIZES)]
            x = torch.randn(2, 3, hin, win, generator=gen, dtype=dtype)
            assert caffe_interp_applies(x)
            got = caffe.interp(x, (hout, wout))
            assert got.shape == (2, 3, hout, wout)
            assert torch.equal(got, grad_path(x, (hout, wout))), (hin, win, hout, wout)
            checked += 1
    assert checked == len(SIZES) ** 2


def test_deeplab_resizes():
    """predict's zoom 8 (65 -> 513), the input scales (513 -> 385 by shrink 4 + zoom 3, 513 -> 257) and the
    attention head's fc7 resize (49 -> 65), plus a cropping Interp (pad_end -2)."""
    gen = torch.Generator().manual_seed(1)
    cases = [((1, 21, 65, 65), caffe.InterpParams(zoom_factor=8)),
             ((1, 3, 513, 513), caffe.scale_interp_params(0.75, (513, 513))),
             ((1, 3, 513, 513), caffe.scale_interp_params(0.5, (513, 513))),
             ((1, 16, 49, 49), (65, 65)),
             ((2, 4, 30, 27), caffe.InterpParams(zoom_factor=2, pad_end=-2))]
    for shape, spec in cases:
        x = torch.randn(*shape, generator=gen)
        got = caffe.interp(x, spec)
        assert torch.equal(got, grad_path(x, spec)), (shape, spec)
    # the corners are copied exactly (aligned corners) and a constant map stays constant
    x = torch.full((1, 1, 9, 7), 0.3)
    y = caffe_interp(x, (17, 25))
    torch.testing.assert_close(y, torch.full_like(y, 0.3), rtol=0, atol=1e-7)
    z = torch.randn(1, 2, 9, 7, generator=gen)
    w = caffe_interp(z, (17, 25))
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert torch.equal(w[..., i, j], z[..., i, j])


def test_dispatch():
    """With a gradient interp stays differentiable (the index_select path); without, the kernel runs."""
    x = torch.randn(1, 2, 5, 6, requires_grad=True)
    assert not caffe_interp_applies(x)
    y = caffe.interp(x, (9, 11))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert caffe_interp_applies(x)
    assert not caffe_interp_applies(torch.zeros(1, 2, 5, 6, dtype=torch.float16))
    assert not caffe_interp_applies(torch.zeros(2, 5, 6))


def test_same_size_is_a_copy():
    x = torch.randn(1, 2, 5, 6)
    y = torch.ops.attnscale.caffe_interp(x, 5, 6)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_input_errors():
    op = torch.ops.attnscale.caffe_interp
    with pytest.raises(ValueError, match="4-D"):
        op(torch.zeros(2, 5, 6), 3, 3)
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(1, 1, 5, 6, dtype=torch.int32), 3, 3)
    with pytest.raises(ValueError, match="output size"):
        op(torch.zeros(1, 1, 5, 6), 0, 3)
    with pytest.raises(ValueError, match="empty spatial size"):
        op(torch.zeros(1, 1, 0, 6), 3, 3)


def test_opcheck():
    x = torch.randn(2, 3, 7, 5)
    torch.library.opcheck(torch.ops.attnscale.caffe_interp, (x, 13, 9), test_utils=("test_schema", "test_faketensor"))


def test_forward_only():
    """A backward through ``caffe_interp`` is an error, not a silently missing gradient."""
    y = caffe_interp(torch.randn(1, 2, 4, 4, requires_grad=True), (7, 7))
    with pytest.raises(RuntimeError, match="forward only"):
        y.sum().backward()
