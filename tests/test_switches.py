"""ATTNSCALE_DISABLE and the comparison blocks (attnscale.switches): each name turns its path off, and only it."""
import pytest
import torch

from attnscale import caffe, switches
from attnscale import model as model_mod
from attnscale.model import AttentionToScale


def test_unknown_names_are_refused_by_the_variable(monkeypatch):
    monkeypatch.setenv(switches.ENV, "pool, bogus")
    with pytest.raises(ValueError, match=r"ATTNSCALE_DISABLE=.*unknown feature\(s\) \['bogus'\]"):
        switches.disabled()
    with pytest.raises(ValueError, match="unknown feature 'bogus'"):
        with switches.torch_path("bogus"):
            pass


def test_names_parse_and_blocks_nest(monkeypatch):
    monkeypatch.setenv(switches.ENV, " pool,,casts ")
    assert switches.disabled() == {"pool", "casts"}
    assert switches.uses_torch("pool") and not switches.uses_torch("interp")
    with switches.torch_path("interp"):
        with switches.torch_path("interp"):
            assert switches.uses_torch("interp")
        assert switches.uses_torch("interp")
    assert not switches.uses_torch("interp")
    monkeypatch.delenv(switches.ENV)
    assert switches.disabled() == frozenset() and not switches.uses_torch("pool")


def test_pool_and_interp_take_the_torch_paths(monkeypatch):
    x = torch.randn(1, 2, 9, 9)
    want_pool, want_interp = caffe.pool2d(x, 3, 2, 1, "max"), caffe.interp(x, (17, 17))
    monkeypatch.setattr(caffe, "caffe_max_pool2d", lambda *a: pytest.fail("the pooling kernel was called"))
    monkeypatch.setattr(caffe, "caffe_interp", lambda *a: pytest.fail("the Interp kernel was called"))
    monkeypatch.setenv(switches.ENV, "pool,interp")
    with torch.no_grad():
        assert torch.equal(caffe.pool2d(x, 3, 2, 1, "max"), want_pool)
        assert torch.equal(caffe.interp(x, (17, 17)), want_interp)
    monkeypatch.setenv(switches.ENV, "interp")  # pooling is back on our kernel
    with torch.no_grad(), pytest.raises(pytest.fail.Exception, match="pooling kernel"):
        caffe.pool2d(x, 3, 2, 1, "max")
    monkeypatch.delenv(switches.ENV)
    with torch.no_grad(), caffe.torch_interp():
        assert torch.equal(caffe.interp(x, (17, 17)), want_interp)
    with torch.no_grad(), pytest.raises(pytest.fail.Exception, match="Interp kernel"):
        caffe.interp(x, (17, 17))


def test_model_features_follow_the_variable(monkeypatch):
    """bias_relu, pad and dropout (forced to apply on this CPU) and the weight-cast cache each turn off by name;
    the model's arguments stay as they were."""
    m = AttentionToScale(5, (1.0, 0.5), "attention", width=1 / 16).train()
    monkeypatch.setattr(model_mod, "bias_relu_applies", lambda x: True)
    x = torch.randn(1, 3, 8, 8)
    ran = {}
    monkeypatch.setattr(model_mod, "bias_relu", lambda y, b, p=0.0: (ran.__setitem__("p", p), y)[1])
    m._bias_relu(x, None, drop=True)
    assert m._fuses(x) and ran["p"] == m.dropout > 0
    monkeypatch.setenv(switches.ENV, "dropout")
    ran.clear()
    m._bias_relu(x, None, drop=True)
    assert ran["p"] == 0.0 and m._fuses(x)
    monkeypatch.setenv(switches.ENV, "bias_relu")
    assert not m._fuses(x) and m.fuse_bias_relu

    monkeypatch.delenv(switches.ENV)
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        w, _ = m._params("fc7", x)
        assert w.dtype == torch.bfloat16 and m._params("fc7", x)[0] is w  # kept
        monkeypatch.setenv(switches.ENV, "casts")
        assert m._params("fc7", x)[0] is m.fc7.weight  # autocast casts it
        monkeypatch.delenv(switches.ENV)
        m.cache_weight_casts = False
        assert m._params("fc7", x)[0] is m.fc7.weight
    assert AttentionToScale(5, (1.0,), None, width=1 / 16, cache_weight_casts=False).cache_weight_casts is False


def test_pad_follows_the_variable(monkeypatch):
    m = AttentionToScale(5, (1.0,), None, width=1 / 16)
    x = torch.empty(1, 3, 8, 8, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    assert m._pads_input(x, m.conv1_1)
    monkeypatch.setenv(switches.ENV, "pad")
    assert not m._pads_input(x, m.conv1_1)
