"""Smoke runs of the benchmark scripts (tiny settings, a few seconds each): they must keep running and
writing their JSON, so that a session with a GPU, or a user, never meets a broken benchmark first.  No
timing is asserted."""
import json
import os
import subprocess
import sys

import pytest
import torch

from attnscale.ops import has_extension

pytestmark = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script, *args, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_bench_merge(tmp_path):
    data, _ = run_bench("bench_merge.py", "--quick", "--threads", "1", "--no-compile", "--cpu-only",
                        tmp_path=tmp_path)
    rows = data["rows"]
    assert {(r["passes"], r["mode"]) for r in rows} == {("fwd", "attention"), ("fwd+bwd", "attention")}
    assert all(r["fused_us"] > 0 and r["eager_us"] > 0 for r in rows)


def test_bench_fc6(tmp_path):
    data, out = run_bench("bench_fc6.py", "--quick", "--threads", "1", "--no-backward", "--device", "cpu",
                          tmp_path=tmp_path)
    assert "oneDNN" in out and data


def test_bench_winograd(tmp_path):
    data, _ = run_bench("bench_winograd.py", "--threads", "1", "--rounds", "1", "--layers", "conv4_2",
                        "--no-backward", tmp_path=tmp_path)
    assert [r["layer"] for r in data["rows"]] == ["conv4_2"]
    assert all(r["winograd_ms"] > 0 and r["onednn_ms"] > 0 for r in data["rows"])


def test_bench_interp(tmp_path):
    data, _ = run_bench("bench_interp.py", "--threads", "1", "--rounds", "1", tmp_path=tmp_path)
    assert {r["case"] for r in data["rows"]} == {"zoom8", "fc7_res075", "fc7_res05", "input075"}


def test_bench_crf(tmp_path):
    data, _ = run_bench("bench_crf.py", "--quick", "--threads", "1", "--rounds", "1", tmp_path=tmp_path)
    assert [r["case"] for r in data["rows"]] == ["voc", "small"]
    assert "numpy" not in data["rows"][0] and data["rows"][1]["vs_numpy"] == data["rows"][1]["numpy"] / data["rows"][1]["ours"]


def test_bench_train(tmp_path):
    """The product's training loop timed from its own log (updates 2 to 4 of a tiny run read from JPEG/PNG
    files), beside the loader alone, in bf16 NHWC here to run those paths too."""
    data, out = run_bench("bench_train.py", "--device", "cpu", "--threads", "1", "--workers", "0", "--width", "0.0625",
                          "--crop", "65", "--batch", "2", "--iter-size", "2", "--warmup", "2", "--iters", "2",
                          "--images", "8", "--precision", "bf16", "--channels-last", "--batches", "bytes",
                          tmp_path=tmp_path)
    row, = data["rows"]
    assert row["images_per_update"] == 4 and row["iters"] == 2 and row["precision"] == "bf16"
    assert row["batches"] == "bytes"        # the GPU's way, forced on the CPU
    assert row["seconds"] > 0 and row["images_per_s"] > 0 and row["loader_images_per_s"] > 0
    assert "train loop" in out
    # the main thread's phases, read from the loop's log lines: on a CPU the passes are the work, and the
    # phases account for the measured update time (what is left: the log line itself and the loop's glue)
    host = row["host_ms_per_update"]
    assert list(host) == ["data", "passes", "wait", "step"] and min(host.values()) >= 0
    assert host["passes"] > 0.5 * sum(host.values())
    assert 0.8 < sum(host.values()) / (row["s_per_update"] * 1e3) < 1.05, (host, row["s_per_update"])
    assert "the main thread per update (ms): data " in out


FAKE_CAFFE_RUNNER = """import sys
import h5py
import torch
sys.path.insert(0, {root!r})
import prototxt_import as pi
proto, weights, inp, prefix, phase = sys.argv[1:6]
assert phase == "TEST" and sys.argv[6] == "0"
net = pi.load_net(proto, weights, use_ops=False)
with h5py.File(inp, "r") as f:
    inputs = {{k: torch.from_numpy(f[k][()]) for k in f}}
if sys.argv[7] == "double":
    net = net.double()
with torch.no_grad(), h5py.File(prefix + "_blobs.h5", "w") as out:
    for k, v in net(return_blobs=True, **inputs).items():
        out.create_dataset(k, data=v.numpy())
print("loss 0")
"""


@pytest.mark.parametrize("net", ["largefov", "attention3"])
def test_caffe_compare_runs(tmp_path, net):
    """benchmarks/caffe_compare.py end to end, with the importer's layer-by-layer executor (``load_net``) in
    Caffe's place (a real Caffe is not here): the prototxt with its declared input shapes, the weights file,
    the inputs and the blob file all go through the runner's interface, and the model's blobs equal the
    executor's by name and shape."""
    from tests.caffe_files import deeplab_prototxt
    runner = tmp_path / "caffe_runner"
    runner.write_text(f"#!{sys.executable}\n" + FAKE_CAFFE_RUNNER.format(root=ROOT))
    runner.chmod(0o755)
    protos = tmp_path / "prototxt"   # the reference nets' structure at 1/16 of their widths
    protos.mkdir()
    (protos / "deeplab_largefov_deploy.prototxt").write_text(deeplab_prototxt(width=1 / 16))
    (protos / "attention3_deploy.prototxt").write_text(deeplab_prototxt((1.0, 0.75, 0.5), "attention", width=1 / 16))
    doc, stdout = run_bench("caffe_compare.py", "--runner", str(runner), "--nets", net, "--size", "33", "--double",
                            "--threads", "1", "--prototxt-dir", str(protos), tmp_path=tmp_path)
    (r,) = doc["compare"]
    assert r["net"] == net and not r["shape_mismatch"] and len(r["blobs"]) >= 22
    assert all("data" in v for v in r["blobs"].values()), r["blobs"]
    assert max(v["data"]["max"] for v in r["blobs"].values()) < 1e-12, stdout


def test_bench_e2e(tmp_path):
    data, _ = run_bench("bench_e2e.py", "--device", "cpu", "--threads", "1", "--jobs", "infer", "train",
                        "--infer-size", "65", "--train-size", "65", "--train-batch", "1", "--reps", "1",
                        "--warmup", "0", "--profile", tmp_path=tmp_path)
    got = {(r["job"], r["variant"]) for r in data["rows"]}
    variants = {"reference", "ops", "ops+fc6", "ops+winograd", "ops+winograd4"}
    # "auto" (the model's defaults) and "auto4" in inference only: they train as "ops" does
    assert got == {(j, v) for j in ("infer", "train") for v in variants} | {
        ("infer", "auto"), ("infer", "auto4"), ("infer", "auto+torchpool")}
    # --profile: where the time goes, per job (operators by self time, with shapes): the defaults'
    assert [(p["job"], p["variant"]) for p in data["profile"]] == [("infer", "auto"), ("train", "ops")]
    assert data["failures"] == [] and data["env"]["disabled"] == []
    for p in data["profile"]:
        assert p["wall_ms"] > 0 and p["busy_ms"] is None and p["top_kernels"] == []
        names = [o["name"] for o in p["top_ops"]]
        assert any("conv" in n for n in names), names
        assert all(o["self_ms"] > 0 for o in p["top_ops"])


def test_bench_e2e_leaves_a_failing_variant_out(monkeypatch):
    """A variant that raises while being set up, warmed up or timed is reported and left out; the others are
    timed.  (On a GPU a CUDA error that leaves the device unusable stops the run: DeviceLost.)"""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_e2e

    calls = {"timed": 0}

    def flaky():
        calls["timed"] += 1
        if calls["timed"] > 2:
            raise RuntimeError("broken kernel\nsecond line")

    def broken_setup():
        raise ValueError("bad shape")

    failures = []
    steps = bench_e2e._build({"ok": lambda: (lambda: None), "setup": broken_setup, "flaky": lambda: flaky,
                              "warm": lambda: (lambda: 1 / 0)}, "cpu", failures)
    assert list(steps) == ["ok", "flaky", "warm"]
    times = bench_e2e._time_interleaved(steps, "cpu", warmup=1, reps=3, failures=failures)
    assert list(times) == ["ok"] and len(times["ok"]) == 3
    assert [(f["variant"], f["stage"]) for f in failures] == [("setup", "set-up"), ("warm", "warm-up"),
                                                              ("flaky", "timing")]
    assert failures[2]["error"] == "RuntimeError: broken kernel\nsecond line"


def test_bench_e2e_iter_variant_runs_the_loops_passes(monkeypatch):
    """"ops+iter3" times the product loop's update: three forward+backward passes of a third of the batch
    each, then one step; "ops" one pass of the whole batch."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_e2e

    made = []
    build = bench_e2e._model
    monkeypatch.setattr(bench_e2e, "_model", lambda *a: made.append(build(*a)) or made[-1])
    for variant, want in (("ops+iter3", [1, 1, 1]), ("ops", [3])):
        step = bench_e2e.train_step(variant, "fp32", "cpu", 33, 3, False)
        seen = []
        made[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
        step()
        assert seen == want, variant
        assert all(p.grad is not None for p in made[-1].parameters() if p.requires_grad)


def test_cuda_sanitize_dry_run():
    """The compute-sanitizer driver of issue 7, with the CPU kernels on both sides; without a GPU its
    normal run refuses with exit code 2."""
    script = os.path.join(ROOT, "benchmarks", "cuda_sanitize.py")
    proc = subprocess.run([sys.executable, script, "--cpu-dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("ok  scale_merge") == 38 and proc.stdout.count("ok  dilated_conv2d") == 12  # 6 cases x 2 algos
    assert proc.stdout.count("ok  caffe_max_pool2d") == 24  # 2 geometries x 4 dtypes x 3 (layout, channels)
    assert proc.stdout.count("ok  bias_relu") == 32  # 2 shapes x 2 dropout ratios x 4 dtypes x 2 layouts
    assert proc.stdout.count("ok  caffe_interp") == 24  # 2 resizes x 4 dtypes x 3 (layout, channels)
    assert proc.stdout.count("ATTNSCALE_MERGE_BACKWARD=pixel") == 8
    import torch
    from attnscale.ops import has_cuda_kernels
    if not (torch.cuda.is_available() and has_cuda_kernels()):
        assert subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True).returncode == 2


def test_cuda_sanitize_sides_are_independent_leaves():
    """Each side of cuda_sanitize.py's comparison gets its own leaf copy: on the H200 (2026-11-26) the CPU
    side's ``requires_grad_()`` made the GPU side's ``.to("cuda")`` a non-leaf whose ``.grad`` stayed None
    (the script crashed), and in the dry run both sides shared one tensor and so one ``.grad``."""
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("cuda_sanitize", os.path.join(ROOT, "benchmarks", "cuda_sanitize.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t = torch.randn(3)
    a = mod.leaf(t, "cpu", torch.float32)
    b = mod.leaf(t, "cpu", torch.float32)
    assert a is not t and b is not a and a.is_leaf and b.is_leaf and a.requires_grad
    (a * 2).sum().backward()
    assert b.grad is None and t.grad is None
    assert not mod.close(None, a.grad, 1.0) and mod.close(a.grad, a.grad.clone(), 1e-12)


def test_merge_kernels_dry_run(tmp_path):
    """benchmarks/merge_kernels.py (kernel launches and GPU time of the merge, issue 2's CUDA target) on CPU
    counts the attnscale ops instead of kernels: one per forward, forward + backward for fwd+bwd."""
    data, _ = run_bench("merge_kernels.py", "--device", "cpu", "--reps", "1", "--logit-groups", "1", "8",
                        "--backward", "element", "pixel", "--chunk-threads", "1", "65536", tmp_path=tmp_path)
    rows, sweep = data["rows"][:6], data["rows"][6:]
    for r in rows:
        assert r["fused_kernels"] == (1 if r["pass"] == "fwd" else 2), r
        assert r["eager_kernels"] == 0, r
    # the chunk sizes only for the pixel layout (the element layout has no class chunks)
    assert [(r["shape"], r["backward"], r["logit_groups"], r["chunk_threads"], r["fused_kernels"])
            for r in sweep] == \
        [(shape, b, g, t, 2) for shape in ("train-N10", "train-N30", "test-N1") for b in ("element", "pixel")
         for g in (1, 8) for t in (("rule",) if b == "element" else (1, 65536))]


def test_gpu_proof_check_reports_a_sanitizer_finding(tmp_path):
    """gpu_proof.sh's check phase (CUDA tests and the sanitizers at once), started as benchmarks/'s ./gpu_proof.sh:
    a sanitizer finding (exit 86 from racecheck) fails the script and is named in proof.log.  Stubs stand
    in for compute-sanitizer and Python."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "compute-sanitizer").write_text(
        '#!/bin/bash\ncase "$*" in *racecheck*) echo "planted hazard"; exit 86;; esac\nexit 0\n')
    (stub / "python").write_text('#!/bin/bash\necho "3 passed in 0.10s"\n')
    for f in stub.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    # a relative script path from benchmarks/ (the script changes folder before it re-runs itself)
    proc = subprocess.run(["bash", "gpu_proof.sh", "check"], cwd=os.path.join(ROOT, "benchmarks"),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(out), "PYTHON": str(stub / "python"),
                               "PATH": f"{stub}:{os.environ['PATH']}"})
    log = (out / "proof.log").read_text()
    assert proc.returncode == 1, log
    assert "3 passed" in log and "check: sanitize failed" in log
    assert "sanitize: racecheck (exit 86)" in log and "memcheck: exit 0" in log
    assert "planted hazard" in (out / "sanitize.log").read_text()
    assert (out / "disabled.txt").read_text() == ""  # the preflight ran beside them (no verdict from the stub)


def test_gpu_proof_bench_turns_failed_features_off(tmp_path):
    """gpu_proof.sh's bench phase runs gpu_preflight.py first and exports the features it failed as
    ATTNSCALE_DISABLE to every benchmark; the failure is named.  A stub stands in for Python."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\ncase "$*" in\n'
                    '  *gpu_preflight.py*) for a; do [ "$prev" = --disabled-to ] && printf pool,pad > "$a"; prev=$a; done;'
                    ' echo "| pool | NO |"; exit 1;;\n'
                    '  *) echo "ran $1 with ATTNSCALE_DISABLE=$ATTNSCALE_DISABLE";;\nesac\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_proof.sh"), "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(out), "PYTHON": str(stub)})
    log = (out / "proof.log").read_text()
    assert proc.returncode == 1 and "bench: a feature failed gpu_preflight.py" in log, log
    assert "ATTNSCALE_DISABLE=pool,pad" in log
    for script in ("bench_e2e.py", "bench_train.py", "bench_merge.py", "bench_fc6.py"):
        assert f"ran benchmarks/{script} with ATTNSCALE_DISABLE=pool,pad" in log, log


def test_gpu_proof_script(tmp_path):
    """benchmarks/gpu_proof.sh parses, and an unknown phase fails with a message in its log."""
    script = os.path.join(ROOT, "benchmarks", "gpu_proof.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    proc = subprocess.run(["bash", script, "nophase"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    assert proc.returncode == 1
    assert "unknown phase 'nophase'" in (tmp_path / "proof.log").read_text()
    # every name is checked before any phase runs (a typo after "build" cost the build's device time first)
    proc = subprocess.run(["bash", script, "build", "chek", "bench"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "typo")}, timeout=60)
    log = (tmp_path / "typo" / "proof.log").read_text()
    assert proc.returncode == 1 and "unknown phase 'chek'" in log and "nothing was run" in log
    assert "phase build" not in log
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "Phases, run in the order given" in usage.stdout
    assert subprocess.run(["bash", script], capture_output=True, text=True, timeout=60).returncode == 2
    prebuild = os.path.join(ROOT, "benchmarks", "gpu_prebuild.sh")
    assert subprocess.run(["bash", "-n", prebuild]).returncode == 0
    for args, rc in ((["--chek"], 2), (["--check", "x"], 2), (["--help"], 0)):  # nothing built or installed
        proc = subprocess.run(["bash", prebuild, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == rc and ("unknown argument" in proc.stderr if rc else "--check" in proc.stdout)


@pytest.mark.parametrize("script,args,says", [
    ("bench_e2e.py", ["--precisions", "fp16"], "invalid choice: 'fp16'"),
    ("bench_e2e.py", ["--reps", "0"], "--reps: must be a positive integer"),
    ("bench_e2e.py", ["--precisions", "tf32", "--device", "cpu"], "tf32 is a CUDA mode"),
    ("bench_train.py", ["--crop", "0"], "--crop: must be a positive integer"),
    ("bench_train.py", ["--width", "nan"], "--width: must be a positive number"),
    ("bench_fc6.py", ["--shapes", "1x0"], "positive N and H"),
    ("bench_interp.py", ["--rounds", "0"], "--rounds: must be a positive integer"),
    ("bench_winograd.py", ["--layers", "nosuch"], "unknown layer(s) ['nosuch']"),
    ("bench_merge.py", ["--threads", "2,0"], "--threads: a comma list of thread counts"),
    ("merge_kernels.py", ["--reps", "-1"], "--reps: must be a positive integer")])
def test_benchmark_arguments_are_checked(monkeypatch, capsys, script, args, says):
    """A bad number or name is a usage error, not a default put in its place, a deep traceback, or (for
    --precisions) float32 rows labelled with the word given."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import importlib
    mod = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as e:
        mod.main(args)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_gpu_preflight_cpu(tmp_path):
    """The per-feature checks' processes on a CPU (where only pooling, Interp and the casts have paths of their
    own), then the passing ones combined: all pass, nothing is disabled, the file for gpu_proof.sh is written
    (empty)."""
    out, dis = tmp_path / "pf.json", tmp_path / "disabled.txt"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_preflight.py"), "--device", "cpu",
                           "--features", "pool,interp", "--json", str(out), "--disabled-to", str(dis)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [(r["feature"], r["ok"]) for r in data["results"]] == [("pool", True), ("interp", True), ("combined", True)]
    assert data["disabled"] == [] and dis.read_text() == ""


def test_gpu_preflight_catches_a_broken_kernel(monkeypatch, tmp_path):
    """A pooling kernel that gets one output wrong fails the pooling check (in this process), and a child that
    dies is reported as failed: its feature goes to ATTNSCALE_DISABLE."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import gpu_preflight
    from attnscale import caffe

    real = caffe.caffe_max_pool2d

    def off_by_one(x, *a):
        y = real(x, *a).clone()
        y.view(-1)[7] += 1.0
        return y
    assert gpu_preflight.check_feature("pool", "cpu")["ok"]
    monkeypatch.setattr(caffe, "caffe_max_pool2d", off_by_one)
    r = gpu_preflight.check_feature("pool", "cpu")
    assert not r["ok"] and any(p.startswith("fp32 infer merged") for p in r["problems"]), r
    assert gpu_preflight.compare({"a": torch.tensor([1.0, float("nan")])}, {"a": torch.tensor([1.0, 2.0])}, 1e-3) == [
        "a: non-finite values differ"]
    w = {"train grad w": torch.tensor([3.0, -4.0]), "infer merged": torch.tensor([3.0, -4.0])}
    off = {k: v + torch.tensor([0.0, 2.5]) for k, v in w.items()}  # half the norm, 0.625 of the largest value
    assert gpu_preflight.compare(off, w, 5e-2, 1.0) == ["infer merged: 0.625"]  # gradients by norm
    assert gpu_preflight.compare(off, w, 5e-2, 0.25) == ["train grad w: 0.5", "infer merged: 0.625"]
    assert gpu_preflight.compare(off, w, 5e-2) == ["train grad w: 0.625", "infer merged: 0.625"]
    # the op-level checks compare bit for bit: an Interp forward one ulp off somewhere fails them
    real_blend = caffe._interp_blend
    monkeypatch.setattr(caffe, "_interp_blend", lambda x, hw: torch.nextafter(
        real_blend(x, hw), torch.tensor(float("inf"), dtype=x.dtype)))
    assert gpu_preflight._interp_ops("cpu") == [f"interp torch.float32 C={c}: forward differs from the index_select path"
                                                for c in (5, 64)]
    # the combined check (every feature on against PyTorch's path for all) sees the broken pooling too; a
    # failed combined run turns every feature off, one without an answer none, a feature failing alone itself
    monkeypatch.setattr(caffe, "_interp_blend", real_blend)  # (nextafter has no derivative in older torch)
    assert not gpu_preflight.check_feature("combined", "cpu")["ok"]
    monkeypatch.setattr(caffe, "caffe_max_pool2d", real)
    assert gpu_preflight.check_feature("combined", "cpu")["ok"]
    res = lambda *oks: [{"feature": f, "ok": ok} for f, ok in zip(("pool", "interp", "casts", "combined"), oks)]  # noqa: E731
    assert gpu_preflight.disabled_after(res(True, True, True, True)) == []
    assert gpu_preflight.disabled_after(res(True, True, True, False)) == ["pool", "interp", "casts"]
    assert gpu_preflight.disabled_after(res(True, True, True, None)) == []
    assert gpu_preflight.disabled_after(res(True, None, False)) == ["interp", "casts"]
    dis = tmp_path / "disabled.txt"  # a child that raises (here: a device string torch refuses) fails its feature
    assert gpu_preflight.main(["--device", "no_such_device", "--features", "casts", "--disabled-to", str(dis)]) == 1
    assert dis.read_text() == "casts"
