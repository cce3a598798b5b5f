"""Training: Caffe's SGD rule by hand, step policy, clipping, exact resume, atomic checkpoints, config."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import attnscale.train as train_mod
from attnscale.config import TrainConfig
from attnscale.data import SegDataset, make_loader
from attnscale.train import (CaffeSGD, atomic_save, build_model, build_source, caffe_rate, clip_gradients,
                             init_from_caffemodel, load_checkpoint, main, make_optimizer, normalize_gradients,
                             set_rate, train, transform_config)


def test_caffe_sgd_updates_a_parameter_without_gradient():
    """Caffe clears every diff to zero and regularises and steps every parameter, whether or not a
    loss reached it; torch's ``grad is None`` is that zero diff, not a skipped parameter."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = CaffeSGD([w], lr=0.1, momentum=0.9, weight_decay=0.1)
    w.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    opt.step()                  # v = [0.06, 0.03], w = [0.94, -2.03]
    w.grad = None
    opt.step()                  # v = 0.9 v + 0.1 * 0.1 w = [0.0634, 0.0067]
    assert torch.allclose(w.data, torch.tensor([0.8766, -2.0367], dtype=torch.float64), atol=1e-12)


def test_caffe_sgd_matches_hand_computation_and_differs_from_torch_sgd():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = CaffeSGD([w], lr=0.1, momentum=0.9, weight_decay=0.1)
    w.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    opt.step()
    # v = 0.1 * (g + 0.1 w) = 0.1 * [0.6, 0.3];  w -= v
    assert torch.allclose(w.data, torch.tensor([0.94, -2.03], dtype=torch.float64), atol=1e-12)
    set_rate(opt, 0.01)        # Caffe "step": the rate drops 10x
    w.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    opt.step()
    # g' = [0.5 + 0.094, 0.5 - 0.203]; v = 0.9 [0.06, 0.03] + 0.01 g' = [0.05994, 0.02997]
    assert torch.allclose(w.data, torch.tensor([0.88006, -2.05997], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(opt.state[w]["history"], torch.tensor([0.05994, 0.02997], dtype=torch.float64))
    # torch.optim.SGD keeps lr outside the momentum and lands elsewhere after the step
    u = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    sgd = torch.optim.SGD([u], lr=0.1, momentum=0.9, weight_decay=0.1)
    for lr in (0.1, 0.01):
        for g in sgd.param_groups:
            g["lr"] = lr
        u.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
        sgd.step()
    assert abs(float(u.data[0]) - 0.88006) > 1e-3


def test_caffe_sgd_group_update_equals_the_per_parameter_rule():
    """The group-wise (foreach) update == Caffe's rule applied parameter by parameter, bit for bit, over
    several steps, groups with different rates, decays and dtypes, and a parameter without a gradient."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (7, 5), (2,)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    ws = [torch.nn.Parameter(b.clone()) for b in base]
    ws.append(torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64)))
    groups = [dict(params=ws[:2], lr=0.01, weight_decay=5e-4), dict(params=ws[2:4], lr=0.1, weight_decay=0.0),
              dict(params=ws[4:], lr=0.001, weight_decay=1e-3)]
    opt = CaffeSGD(groups, lr=0.01, momentum=0.9)
    ref = [w.detach().clone() for w in ws]
    hist = [torch.zeros_like(w) for w in ref]
    lrs, wds = [0.01, 0.01, 0.1, 0.1, 0.001], [5e-4, 5e-4, 0.0, 0.0, 1e-3]
    for step in range(3):
        grads = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in ws]
        grads[3] = None if step == 1 else grads[3]
        for w, g in zip(ws, grads):
            w.grad = g
        opt.step()
        for i, g in enumerate(grads):
            g = torch.zeros_like(ref[i]) if g is None else g
            if wds[i] != 0:
                g = g.add(ref[i], alpha=wds[i])
            hist[i].mul_(0.9).add_(g, alpha=lrs[i])
            ref[i].sub_(hist[i])
        for w, r, h in zip(ws, ref, hist):
            assert torch.equal(w.detach(), r) and torch.equal(opt.state[w]["history"], h)


def test_step_policy():
    cfg = TrainConfig()
    assert [caffe_rate(cfg, i) for i in (0, 1999, 2000, 3999, 4000, 5999)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])


def test_local_rates_are_rounded_as_caffe_does(tmp_path):
    """Caffe: ``Dtype rate = base_lr() * pow(gamma(), step)`` (proto floats, product in double, then
    Dtype), ``local_rate = rate * lr_mult`` and ``local_decay = weight_decay * decay_mult`` in float
    for a float net.  With base_lr 0.001 the x10 classifier's rate is 0.010000001, not 0.01."""
    f32 = np.float32
    cfg = _tiny(tmp_path, base_lr=0.001, gamma=0.1, stepsize=2000)
    assert caffe_rate(cfg, 0) == float(f32(0.001))
    assert caffe_rate(cfg, 2000) == float(f32(0.001)) * float(f32(0.1))
    opt = make_optimizer(build_model(cfg), cfg)
    for it in (0, 2000, 4000):
        rate = caffe_rate(cfg, it)
        set_rate(opt, rate)
        for g in opt.param_groups:
            want = f32(f32(rate) * f32(g["lr_mult"]))
            assert g["lr"] == float(want), (it, g["name"], g["lr"], want)
            assert g["weight_decay"] == float(f32(f32(cfg.weight_decay) * f32(g["decay_mult"])))
    assert float(f32(f32(0.001) * f32(10))) != float(f32(0.01))   # the rounding the test pins down
    # a float64 net (Caffe Dtype = double) keeps the double product
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt64 = CaffeSGD([{"params": [w], "lr_mult": 10.0}], lr=0.1)
    set_rate(opt64, caffe_rate(cfg, 0))
    assert opt64.param_groups[0]["lr"] == float(f32(0.001)) * 10.0


def test_caffe_rate_follows_every_caffe_policy(tmp_path):
    """``GetLearningRate``: multistep against Caffe's own counter (incremented at most once per update, so
    unsorted or repeated stepvalues climb one update at a time); the Dtype policies against their formulas."""
    f32 = np.float32
    for values in ([3, 7], [5, 5, 5], [8, 2, 4], [0, 1]):
        cfg = _tiny(tmp_path, lr_policy="multistep", stepvalue=values, gamma=0.5, base_lr=0.1, max_iter=12)
        step = 0
        for it in range(12):
            if step < len(values) and it >= values[step]:
                step += 1
            assert caffe_rate(cfg, it) == float(f32(0.1)) * 0.5 ** step, (values, it)
    cfg = _tiny(tmp_path, lr_policy="poly", power=0.9, base_lr=0.001, max_iter=20000)
    assert caffe_rate(cfg, 0) == float(f32(0.001))
    for it, rel in ((1, 1e-6), (777, 1e-6), (10000, 1e-6), (19999, 1e-3)):   # 1 - it / max_iter in float
        assert caffe_rate(cfg, it) == pytest.approx(0.001 * (1 - it / 20000) ** 0.9, rel=rel)
        assert np.float32(caffe_rate(cfg, it)) == caffe_rate(cfg, it)      # a Dtype (float) product
    cfg = _tiny(tmp_path, lr_policy="inv", gamma=1e-4, power=0.75, base_lr=0.01)
    assert caffe_rate(cfg, 5000) == pytest.approx(0.01 * (1 + 1e-4 * 5000) ** -0.75, rel=1e-6)
    cfg = _tiny(tmp_path, lr_policy="sigmoid", gamma=0.01, stepsize=300, base_lr=0.01)
    assert caffe_rate(cfg, 300) == pytest.approx(0.005, rel=1e-6)
    assert caffe_rate(cfg, 1000) == pytest.approx(0.01 / (1 + math.exp(-7)), rel=1e-5)
    cfg = _tiny(tmp_path, lr_policy="exp", gamma=0.999, base_lr=0.01)
    assert caffe_rate(cfg, 1000) == float(f32(0.01)) * float(f32(0.999)) ** 1000
    cfg = _tiny(tmp_path, lr_policy="multistep", gamma=0.5)       # no stepvalue: base_lr throughout, as Caffe
    assert caffe_rate(cfg, 5000) == caffe_rate(cfg, 0) == float(f32(0.01))
    with pytest.raises(ValueError, match="one of Caffe's fixed, step, exp, inv, multistep, poly, sigmoid"):
        _tiny(tmp_path, lr_policy="cosine")
    with pytest.raises(ValueError, match="gamma must be >= 0 for lr_policy 'step'"):
        _tiny(tmp_path, gamma=-0.1)


def test_clip_gradients_caffe_rule():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([p], 10.0) == pytest.approx(5.0)
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0]))          # under the threshold: untouched
    assert clip_gradients([p], 2.5) == pytest.approx(5.0)
    assert torch.equal(p.grad, torch.tensor([1.5, 2.0]))
    normalize_gradients([p], 3)            # Caffe's Normalize: times Dtype(1) / iter_size, a float
    assert torch.equal(p.grad, torch.tensor([1.5, 2.0]) * torch.tensor(np.float32(1) / np.float32(3)))


def test_iter_size_accumulates_unscaled_then_normalizes(tmp_path):
    """Caffe's order (Solver::Step, SGDSolver::ApplyUpdate): the iter_size passes' unscaled diffs are
    summed, then scaled by the float 1/iter_size.  Back-propagating loss / iter_size instead gives the
    same maths with other roundings; the first update's momentum history (lr * g) shows which."""
    cfg = _tiny(tmp_path, iter_size=3, batch_size=1, dropout=0.0, weight_decay=0.0, momentum=0.0)
    ck = load_checkpoint(train(cfg, progress=False, stop_at=1).checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)  # as train() ran: oneDNN's sums depend on the thread count
    try:
        _check_first_update(cfg, ck)
    finally:
        torch.set_num_threads(threads)


def _check_first_update(cfg, ck):
    torch.manual_seed(cfg.seed)
    m = build_model(cfg)
    m.train()
    ds = SegDataset(build_source(cfg, "train"), transform_config(cfg), train=True, seed=cfg.seed)
    batches = iter(make_loader(ds, cfg.batch_size, 0, cfg.seed))
    for _ in range(cfg.iter_size):
        x, y = next(batches)
        m.loss(m(x), y)[0].backward()
    params = [p for g in make_optimizer(m, cfg).param_groups for p in g["params"]]
    normalize_gradients(params, cfg.iter_size)
    lrs = [g["lr"] for g in ck["optimizer"]["param_groups"] for _ in g["params"]]
    hist = [ck["optimizer"]["state"][i]["history"] for i in range(len(params))]
    assert all(torch.equal(h, torch.zeros_like(p).add_(p.grad, alpha=lr)) for h, p, lr in zip(hist, params, lrs))


def _tiny(out_dir, **kw):
    d = dict(dataset="synthetic", scales=[1.0, 0.5], merge="attention", extra_supervision=True,
             width=1 / 32, use_reference_ops=False, synthetic_size=33, crop_size=25, test_crop_size=33,
             synthetic_train=6, synthetic_val=2, batch_size=2, iter_size=2, max_iter=4, stepsize=2,
             snapshot=100, workers=0, out_dir=str(out_dir), seed=3, base_lr=0.01, torch_threads=1)
    d.update(kw)
    return TrainConfig(**d).validate()


def test_param_groups_get_caffe_multipliers(tmp_path):
    cfg = _tiny(tmp_path)
    m = build_model(cfg)
    opt = make_optimizer(m, cfg)
    set_rate(opt, 1e-3)
    by_name = {g.get("name", i): g for i, g in enumerate(opt.param_groups)}
    lrs = sorted(round(g["lr"] / 1e-3, 5) for g in opt.param_groups)
    assert lrs == [1.0, 2.0, 10.0, 20.0]
    assert all(g["momentum"] == float(np.float32(0.9)) for g in by_name.values())   # a float field in Caffe


def test_prototxt_lr_mults_are_those_of_the_training_prototxt(tmp_path):
    """``lr_mults="prototxt"``: every parameter's (lr_mult, decay_mult) as attention3_train_esupv.prototxt
    declares them (``param`` lines; Caffe's defaults 1/1 where a layer has none)."""
    from prototxt_import.readers import read_net, upgraded_layers
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "prototxt", "attention3_train_esupv.prototxt")
    if not os.path.exists(path):
        pytest.skip("the shared reference prototxts are not beside the checkout")
    want = {}
    for lp in upgraded_layers(read_net(path)):
        if lp.type == "Convolution" and "_res0" not in lp.name:   # the other scales share these params
            specs = [(p.lr_mult if p.HasField("lr_mult") else 1.0, p.decay_mult if p.HasField("decay_mult") else 1.0)
                     for p in lp.param]
            specs += [(1.0, 1.0)] * (2 - len(specs))
            want[lp.name] = specs
    cfg = _tiny(tmp_path, lr_mults="prototxt", merge="attention", scales=[1.0, 0.75, 0.5],
                classifier_name="fc8_voc12")
    model = build_model(cfg)
    got = {}
    for g in make_optimizer(model, cfg).param_groups:
        for p in g["params"]:
            got[id(p)] = (g["lr_mult"], g["decay_mult"])
    seen = 0
    for name, m in model.named_children():
        if isinstance(m, torch.nn.Conv2d):
            assert [got[id(m.weight)], got[id(m.bias)]] == want[name], name
            seen += 1
    assert seen == len(want) == 18     # 13 trunk + fc6, fc7, fc8 + att_conv1, att_conv2
    assert want["att_conv1"] == [(1.0, 1.0), (1.0, 1.0)] and want["fc8_voc12"] == [(1.0, 1.0), (2.0, 0.0)]
    with pytest.raises(ValueError, match="lr_mults"):
        _tiny(tmp_path, lr_mults="caffe")


def test_resume_is_bit_identical(tmp_path):
    a = _tiny(tmp_path / "a")
    ra = train(a, progress=False)
    b = _tiny(tmp_path / "b")
    rb1 = train(b, progress=False, stop_at=2)
    assert rb1.iterations == 2
    assert load_checkpoint(rb1.checkpoint)["iter"] == 2
    rb2 = train(b, resume=True, progress=False)
    assert ra.iterations == rb2.iterations == 4
    ca, cb = load_checkpoint(ra.checkpoint), load_checkpoint(rb2.checkpoint)
    init = build_model(_tiny(tmp_path / "c")).state_dict()
    changed = 0
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
        changed += int(not torch.equal(v, init[k]))
    assert changed > 10                                   # training did move the weights
    ha = [s["history"] for s in ca["optimizer"]["state"].values()]
    hb = [s["history"] for s in cb["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(ha, hb))
    # a fresh run never overwrites a checkpoint (a forgotten --resume would lose the run) ...
    c = _tiny(tmp_path / "d")
    rc1 = train(c, progress=False, stop_at=2)
    with pytest.raises(FileExistsError, match="--resume"):
        train(c, resume=False, progress=False)
    assert load_checkpoint(rc1.checkpoint)["iter"] == 2
    e = _tiny(tmp_path / "e")
    os.makedirs(os.path.join(e.out_dir, "checkpoint.pt"))
    for resume in (True, False):   # a folder in the checkpoint's place: refused before training, not at the save
        with pytest.raises(ValueError, match="checkpoint.pt is not a file"):
            train(e, resume=resume, progress=False)
    # ... with the checkpoint moved away, it starts from scratch: the same seed, the same run
    os.replace(rc1.checkpoint, rc1.checkpoint + ".old")
    rc = train(c, resume=False, progress=False)
    cc = load_checkpoint(rc.checkpoint)
    assert cc["iter"] == 4
    assert torch.equal(cc["model"]["conv1_1.weight"], ca["model"]["conv1_1.weight"])  # same seed, same run
    assert os.path.getsize(os.path.join(a.out_dir, "train.log")) > 0


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_non_finite_weights_are_never_saved(tmp_path):
    """A finite loss can still give non-finite weights (here the second update's rate, 0.01 x 1e42, is inf
    in float32): the snapshot refuses them, and the last good checkpoint stays."""
    cfg = _tiny(tmp_path, max_iter=2, stepsize=1, gamma=1e42, snapshot=1)
    with pytest.raises(FloatingPointError, match="non-finite weights after iteration 2 .*left as it was"):
        train(cfg, progress=False)
    after = load_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"))
    before = load_checkpoint(train(_tiny(tmp_path / "ref", max_iter=1), progress=False).checkpoint)
    assert after["iter"] == 1 and all(torch.equal(v, after["model"][k]) for k, v in before["model"].items())


def test_atomic_checkpoint_survives_crash_mid_write(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    atomic_save({"iter": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PARTIAL-GARBAGE" * 10)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"iter": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_checkpoint(path, keys=("iter", "w"))
    assert ck["iter"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    bad = tmp_path / "torn.pt"
    bad.write_bytes(b"torn")
    with pytest.raises(ValueError, match="torn.pt"):
        load_checkpoint(str(bad))


def test_init_copies_layers_by_name(tmp_path):
    pre = _tiny(tmp_path / "pre", scales=[1.0], merge=None, extra_supervision=False,
                classifier_name="fc8_pretrain", max_iter=1)
    r = train(pre, progress=False)
    cfg = _tiny(tmp_path / "row", init=r.checkpoint)
    m = build_model(cfg)
    src = load_checkpoint(r.checkpoint)["model"]
    assert torch.equal(m.state_dict()["conv1_1.weight"], src["conv1_1.weight"])
    assert torch.equal(m.state_dict()["fc7.weight"], src["fc7.weight"])
    assert "fc8_synthetic.weight" in m.state_dict() and "fc8_synthetic.weight" not in src
    with pytest.raises(FileNotFoundError, match="vgg16_20M.caffemodel"):
        init_from_caffemodel(m, str(tmp_path / "vgg16_20M.caffemodel"))


def test_config_json_round_trip_and_errors(tmp_path):
    cfg = _tiny(tmp_path, random_scale=(0.5, 1.5))
    p = str(tmp_path / "c.json")
    cfg.save(p)
    assert TrainConfig.load(p) == cfg
    with open(p, "w") as f:
        json.dump({"max_iterr": 3}, f)
    with pytest.raises(ValueError, match="max_iterr"):
        TrainConfig.load(p)
    with open(p, "w") as f:
        f.write("{ not json")
    with pytest.raises(ValueError, match="c.json"):
        TrainConfig.load(p)
    with pytest.raises(ValueError, match="merge"):
        TrainConfig(scales=[1.0, 0.5], merge=None).validate()


def test_cli_trains_from_a_config_file(tmp_path, capsys):
    cfg = _tiny(tmp_path / "run", scales=[1.0], merge=None, extra_supervision=False, max_iter=2)
    p = str(tmp_path / "cfg.json")
    cfg.save(p)
    assert main([p, "--no-progress"]) == 0
    assert "done: 2 iterations" in capsys.readouterr().out
    assert load_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"))["iter"] == 2


def test_torchrun_two_processes_use_ddp(tmp_path):
    """Multi-process training needs no code change: torchrun sets WORLD_SIZE and train() wraps
    the model in DistributedDataParallel (gloo on CPU)."""
    import subprocess
    import sys
    cfg = _tiny(tmp_path / "ddp", max_iter=2, iter_size=1)
    p = str(tmp_path / "cfg.json")
    cfg.save(p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "attnscale.train", p, "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    log = open(os.path.join(cfg.out_dir, "train.log")).read()
    assert "x 2 rank(s)" in log
    ck = load_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"))
    assert ck["iter"] == 2 and isinstance(ck["rng"], list) and len(ck["rng"]) == 2 and ck["world"] == 2
    # resumed by one process: another batch per update and shard, so refused (it went on silently)
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\), this run has 1"):
        train(_tiny(tmp_path / "ddp", max_iter=3, iter_size=1), resume=True, progress=False)
    del ck["world"]   # a checkpoint from before "world" was saved: its RNG list gives the count
    atomic_save(ck, os.path.join(cfg.out_dir, "checkpoint.pt"))
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\), this run has 1"):
        train(_tiny(tmp_path / "ddp", max_iter=3, iter_size=1), resume=True, progress=False)


def _caffemodel(path, layers):
    """Write a binary .caffemodel holding ``layers``: [(name, [numpy arrays])]."""
    from prototxt_import import message_class
    net = message_class("NetParameter")()
    for name, arrays in layers:
        lp = net.layer.add()
        lp.name, lp.type = name, "Convolution"
        for a in arrays:
            b = lp.blobs.add()
            b.shape.dim.extend(a.shape)
            b.data.extend(a.ravel().tolist())
    with open(path, "wb") as f:
        f.write(net.SerializeToString())


def test_init_from_caffemodel_copies_by_layer_name(tmp_path):
    import numpy as np
    cfg = _tiny(tmp_path / "r")
    m = build_model(cfg)
    w11 = np.random.default_rng(0).normal(size=tuple(m.conv1_1.weight.shape)).astype(np.float32)
    b11 = np.arange(m.conv1_1.bias.numel(), dtype=np.float32)
    fc8_before = m.fc8_synthetic.weight.detach().clone()
    p = str(tmp_path / "vgg16_20M.caffemodel")
    _caffemodel(p, [("conv1_1", [w11, b11]), ("fc8", [np.ones((1000, 4, 1, 1), np.float32)])])
    copied = init_from_caffemodel(m, p)
    assert copied == ["conv1_1.weight", "conv1_1.bias"]
    assert torch.equal(m.conv1_1.weight.detach(), torch.from_numpy(w11))
    assert torch.equal(m.conv1_1.bias.detach(), torch.from_numpy(b11))
    assert torch.equal(m.fc8_synthetic.weight.detach(), fc8_before)   # ImageNet fc8 is not copied
    bad = str(tmp_path / "bad.caffemodel")
    _caffemodel(bad, [("conv1_2", [np.zeros((3, 3, 3, 3), np.float32)])])
    with pytest.raises(ValueError, match="conv1_2.*bad.caffemodel|bad.caffemodel.*conv1_2"):
        init_from_caffemodel(m, bad)


def test_init_refuses_a_layer_with_another_blob_count(tmp_path):
    """Caffe's CopyTrainedLayersFrom: 'Incompatible number of blobs for layer' when a same-named
    layer has another number of blobs (here a weight without its bias, or none at all); layers
    without parameters (ReLU, pooling: 0 blobs) still pass."""
    import numpy as np
    m = build_model(_tiny(tmp_path / "r"))
    w = np.zeros(tuple(m.conv1_1.weight.shape), np.float32)
    for layers in ([("conv1_1", [w])], [("conv1_1", [w, np.zeros(m.conv1_1.bias.shape, np.float32)]), ("conv1_2", [])]):
        p = str(tmp_path / "one.caffemodel")
        _caffemodel(p, layers)
        with pytest.raises(ValueError, match=r"one.caffemodel: layer 'conv1_[12]' has [01] blob\(s\) where the model's has 2"):
            init_from_caffemodel(m, p)
    _caffemodel(p, [("conv1_1", [w, np.zeros(m.conv1_1.bias.shape, np.float32)]), ("relu1_1", []), ("pool1", [])])
    assert init_from_caffemodel(m, p) == ["conv1_1.weight", "conv1_1.bias"]


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    m = build_model(_tiny(tmp_path / "r"))
    p = str(tmp_path / "other.pt")
    torch.save({"epoch": 3, "net": {}}, p)
    with pytest.raises(ValueError, match=r"other.pt: not an attnscale checkpoint: it lacks \['model'\]"):
        init_from_caffemodel(m, p)
    torch.save(m.state_dict(), p)   # a bare state_dict is taken as the model's weights
    assert "conv1_1.weight" in init_from_caffemodel(m, p)


@pytest.mark.cuda
def test_resume_on_cuda(tmp_path):
    """A CUDA run resumes: the checkpoint's RNG states go back to torch as CPU byte tensors and the
    momentum history to the parameters' device; the resumed run ends where an uninterrupted one does
    (up to cuDNN's non-deterministic sums)."""
    a = _tiny(tmp_path / "a", device="cuda")
    ra = train(a, progress=False)
    b = _tiny(tmp_path / "b", device="cuda")
    train(b, progress=False, stop_at=2)
    rb = train(b, resume=True, progress=False)
    assert ra.iterations == rb.iterations == 4
    ca, cb = load_checkpoint(ra.checkpoint), load_checkpoint(rb.checkpoint)
    for k, v in ca["model"].items():
        torch.testing.assert_close(cb["model"][k], v, rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.cuda
def test_cuda_training_passes_do_not_sync(tmp_path):
    """On a GPU the passes of an update queue their work without waiting for it: the losses are read once
    per update and the labels are checked on the CPU, so a run with 3 passes per update makes as many
    synchronising calls (torch.cuda.set_sync_debug_mode) as one with 1 pass, for the same updates."""
    import warnings
    counts = []
    for i, iter_size in enumerate((1, 3)):
        cfg = _tiny(tmp_path / str(i), device="cuda", iter_size=iter_size, max_iter=3, dropout=0.0)
        train(_tiny(tmp_path / f"warm{i}", device="cuda", max_iter=1), progress=False)  # CUDA and cuDNN set up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, progress=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    """--resume continues the same run: a changed batch, iter_size or weight decay would silently mix
    two configs (the data position and the optimizer's groups come from the checkpoint); only the
    run fields (device, threads, snapshot, max_iter, ...) may change."""
    cfg = _tiny(tmp_path / "run", max_iter=4)
    train(cfg, progress=False, stop_at=2)
    for change in (dict(batch_size=3), dict(weight_decay=0.05), dict(scales=[1.0], merge=None,
                                                                      extra_supervision=False)):
        other = _tiny(tmp_path / "run", max_iter=4, **change)
        with pytest.raises(ValueError, match=r"--resume: .*checkpoint.pt was written by another config: "
                                             + list(change)[0]):
            train(other, resume=True, progress=False)
    more = _tiny(tmp_path / "run", max_iter=5, snapshot=1, display=1)
    assert train(more, resume=True, progress=False).iterations == 5


def test_list_paths_resolve_under_the_data_root(tmp_path, monkeypatch):
    """The data set's default list is the data root's, whatever the working directory holds; a
    given relative list may be under the root or the working directory, not both."""
    from attnscale.data import SyntheticSource
    from attnscale.train import resolve_list
    root = tmp_path / "VOC"
    SyntheticSource(3, seed=0, size=33).export(str(root), "val")
    cwd = tmp_path / "elsewhere"
    (cwd / "list").mkdir(parents=True)
    (cwd / "list" / "val.txt").write_text("/JPEGImages/other.jpg /SegmentationClassAug/other.png\n")
    monkeypatch.chdir(cwd)
    cfg = TrainConfig(dataset="voc12", data_root=str(root))
    assert len(build_source(cfg, "val")) == 3
    assert resolve_list("", "list/val.txt", str(root), "x") == str(root) + "/list/val.txt"
    with pytest.raises(ValueError, match="names two different files"):
        resolve_list("list/val.txt", "list/val.txt", str(root), "config.val_list")
    assert resolve_list("list/only_here.txt", "", str(root), "x") == str(root) + "/list/only_here.txt"


def test_config_fc6_impl_reaches_the_model():
    """config.fc6_impl (a run field: resuming may change it) is the model's fc6_impl."""
    from attnscale.config import RUN_FIELDS
    assert "fc6_impl" in RUN_FIELDS
    cfg = TrainConfig(width=0.0625, fc6_impl="ops").validate()
    assert build_model(cfg).fc6_impl == "ops" and build_model(TrainConfig(width=0.0625)).fc6_impl == "auto"


def test_config_validation_names_the_field():
    for bad, words in ((dict(display=0), "display must be positive"), (dict(crop_size=-8), "crop_size must be >= 0"),
                       (dict(crop_size="25"), "crop_size must be an integer"),
                       (dict(crop_size=0, batch_size=2), "crop_size 0 .* needs batch_size 1"),
                       (dict(random_scale=(0.5,)), r"random_scale must be \[lo, hi\]"),
                       (dict(synthetic_size=12), "synthetic_size must be >= 14"),
                       (dict(merge="attention"), "one scale: merge must be null"),
                       (dict(extra_supervision=True), "one scale"), (dict(mirror=1), "mirror must be true or false"),
                       (dict(dropout=1.0), "dropout"), (dict(fc6_impl="cudnn"), "fc6_impl must be"),
                       (dict(precision="fp16"), "precision must be 'fp32', 'tf32' or 'bf16'"),
                       (dict(precision="tf32"), "'tf32' is a CUDA mode.*'cpu'")):
        with pytest.raises(ValueError, match=words):
            TrainConfig(**bad).validate()
    with pytest.raises(ValueError, match="scales must be a list of finite numbers"):
        TrainConfig.from_dict({"scales": [1, "a"], "merge": "max"})
    # JSON's NaN and Infinity are refused (they trained to an all-NaN checkpoint and reported success)
    for k, v in (("momentum", "NaN"), ("base_lr", "Infinity"), ("weight_decay", "NaN"), ("gamma", "-Infinity")):
        with pytest.raises(ValueError, match=f"config.{k} must be a finite number"):
            TrainConfig.from_dict(json.loads(f'{{"{k}": {v}}}'))
    with pytest.raises(ValueError, match="scales must be a list of finite numbers"):
        TrainConfig.from_dict(json.loads('{"scales": [1, NaN], "merge": "max"}'))


def test_a_device_this_machine_lacks_is_named(tmp_path, monkeypatch):
    """A CUDA config on a machine without CUDA is refused for what it is, in training and in evaluation
    (it surfaced as "cannot read checkpoint" there)."""
    from attnscale.evaluate import load_model_from_checkpoint
    from attnscale.train import run_device
    assert run_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="config.device 'gpu'"):
        run_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _tiny(tmp_path / "run", device="cuda", max_iter=1)
    with pytest.raises(ValueError, match=r"config.device 'cuda': this machine has no CUDA device"):
        train(cfg, progress=False)
    assert not os.path.exists(os.path.join(cfg.out_dir, "checkpoint.pt"))
    ck = train(_tiny(tmp_path / "cpu", max_iter=1), progress=False).checkpoint
    with pytest.raises(ValueError, match=r"config.device 'cuda': this machine has no CUDA device"):
        load_model_from_checkpoint(cfg, ck, "cuda")


def test_precision_and_memory_layout(tmp_path, monkeypatch):
    """config.precision "bf16" runs the forward under bfloat16 autocast (the losses, gradients and solver in
    float32): the run trains and ends near, not at, the float32 one; config.channels_last (a run field) keeps
    the model and batches in NHWC memory and computes what NCHW does; TF32 is off during a run unless asked
    for, and the switches are restored after it; each update reads its losses from the device once."""
    from attnscale.config import RUN_FIELDS
    assert "channels_last" in RUN_FIELDS and "precision" not in RUN_FIELDS
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real_tolist(t))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    seen = []
    real_train = train_mod._train
    monkeypatch.setattr(train_mod, "_train", lambda *a: seen.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark))
        or real_train(*a))
    torch.backends.cudnn.allow_tf32 = True   # PyTorch's default: a run in float32 turns it off
    torch.backends.cudnn.benchmark = False   # PyTorch's default: a run (fixed crop size) turns it on
    try:
        r32 = train(_tiny(tmp_path / "fp32"), progress=False)
        assert seen == [(False, False, True)] and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = before
    assert len(reads) == 5  # one per update (4 updates of 2 passes), one for the snapshot's weight check
    # one update each (the tiny net's later ones are chaotic: its loss jumps to ~90 and back); no dropout:
    # its masks are drawn in memory order, so NHWC draws others
    one32, onebf, onecl = (train(_tiny(tmp_path / f"one{i}", max_iter=1, dropout=0.0, **kw), progress=False)
                           for i, kw in enumerate((dict(), dict(precision="bf16"), dict(channels_last=True))))
    w32, wbf, wcl = (load_checkpoint(r.checkpoint)["model"] for r in (one32, onebf, onecl))
    for k, v in w32.items():
        torch.testing.assert_close(wcl[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert math.isfinite(onebf.last_loss) and onebf.last_loss != one32.last_loss
    assert onebf.last_loss == pytest.approx(one32.last_loss, rel=0.01)
    init = build_model(_tiny(tmp_path / "init")).state_dict()
    for k in ("conv1_1.weight", "fc6.weight", "att_conv2.weight"):
        assert wbf[k].dtype == torch.float32
        step32, stepbf = w32[k] - init[k], wbf[k] - init[k]
        assert not torch.equal(stepbf, step32) and step32.abs().max() > 0
        torch.testing.assert_close(stepbf, step32, rtol=0.1, atol=0.03 * float(step32.abs().max()), msg=k)
    # precision is part of what a run computes: resuming with another one is refused
    with pytest.raises(ValueError, match="written by another config: precision 'fp32' there, 'bf16' now"):
        train(_tiny(tmp_path / "fp32", precision="bf16", max_iter=5), resume=True, progress=False)
    assert train(_tiny(tmp_path / "fp32", channels_last=True, max_iter=5), resume=True,
                 progress=False).iterations == 5


def test_a_bad_label_is_refused_before_the_batch_leaves_the_cpu(tmp_path, monkeypatch):
    """The training loop checks each batch's labels on the CPU (model.check_labels), so the device step
    needs no sync for it; a class id outside [0, C) that is not 255 stops the run with its values."""
    import attnscale.data.synthetic as synth
    real = synth.SyntheticSource.load

    def bad_load(self, i):
        img, lab, name = real(self, i)
        lab[lab != 255] = 40
        return img, lab, name
    monkeypatch.setattr(synth.SyntheticSource, "load", bad_load)
    with pytest.raises(ValueError, match=r"^label values \[40\] are outside \[0, "):  # not the loss's check
        train(_tiny(tmp_path / "bad"), progress=False)


def test_the_byte_label_check_agrees_with_the_element_wise_one():
    """check_labels takes the loader's uint8 labels by a histogram (one pass) and any other integer labels
    element-wise: both refuse the same labels with the same message, and pass the same ones."""
    from attnscale.model import check_labels
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 21, (3, 17, 19), generator=g).to(torch.uint8)
    base[:, :2] = 255
    cases = [(base, 21), (base, 300), (base, 0), (base[:, ::2, 1:], 21)]      # fine; fine; all bad; strided
    for bad in ((21,), (22, 254), (100,)):
        y = base.clone()
        for i, v in enumerate(bad):
            y[1, 3 + i, 4] = v
        cases.append((y, 21))
    cases.append((base, 21, 7))                                               # another ignore label: 255 is bad
    outcomes = []
    for y, c, *ignore in cases:
        got = []
        for labels in (y, y.long()):
            try:
                check_labels(labels, c, *ignore)
                got.append(None)
            except ValueError as e:
                got.append(str(e))
        assert got[0] == got[1], (c, ignore, got)
        outcomes.append(got[0] is None)
    assert outcomes == [True, True, False, True, False, False, False, False]
    # the element-wise test widens a narrow type first: in int8 (or uint8 on a GPU) the bounds would wrap
    narrow = torch.tensor([[[0, 20, 99]]], dtype=torch.int8)
    check_labels(narrow, 300)                                  # 300 would wrap to 44 and refuse 99
    with pytest.raises(ValueError, match=r"label values \[99\] are outside \[0, 21\)"):
        check_labels(narrow, 21, -1)                           # -1 == 255 in uint8; fine in int8 too


@pytest.mark.cuda
def test_the_label_check_on_the_gpu_agrees_with_the_cpu():
    """On a GPU a uint8 batch takes the element-wise test (one sync); its verdicts are the CPU histogram's."""
    from attnscale.model import check_labels
    y = torch.randint(0, 21, (2, 9, 9), dtype=torch.uint8)
    y[:, 0] = 255
    for c, ignore, bad in ((21, 255, None), (300, 255, None), (21, -1, 255), (21, 256, 255), (21, 255, 40)):
        z = y.clone()
        if bad is not None:
            z[1, 2, 3] = bad
        got = []
        for labels in (z, z.cuda()):
            try:
                check_labels(labels, c, ignore)
                got.append(None)
            except ValueError as e:
                got.append(str(e))
        assert got[0] == got[1] and (got[0] is None) == (bad is None), (c, ignore, got)



@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_as_bytes_train_the_same_weights(tmp_path, monkeypatch, channels_last):
    """A GPU run loads the crops as bytes and makes the network input on the device (loads_bytes); the same
    loop on the CPU with that path forced trains the same weights bit for bit (random scales: padded crops,
    mirrored ones), and its log gives the main thread's phases per update."""
    kw = dict(random_scale=[0.5, 1.2], max_iter=3, channels_last=channels_last, display=1)
    ref = load_checkpoint(train(_tiny(tmp_path / "floats", **kw), progress=False).checkpoint)
    monkeypatch.setattr(train_mod, "loads_bytes", lambda device: True)
    cfg = _tiny(tmp_path / "bytes", **kw)
    got = load_checkpoint(train(cfg, progress=False).checkpoint)
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k
    log = open(os.path.join(cfg.out_dir, "train.log")).read()
    assert len(re.findall(r"; host ms/update: data [\d.]+, passes [\d.]+, wait [\d.]+, step [\d.]+\n", log)) == 3
