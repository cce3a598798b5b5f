"""attnscale.malloc.keep_freed_memory: freed tensor memory stays in the process (glibc mallopt)."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from attnscale import evaluate, malloc, reproduce, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from attnscale.malloc import keep_freed_memory

    def step():  # a step's activations: tensors of 48, 24, 12 and 48 MB, freed in another order
        a = torch.empty(12 << 20).fill_(1.0)
        b = torch.empty(6 << 20).fill_(1.0)
        del a
        c = torch.empty(3 << 20).fill_(1.0)
        d = torch.empty(12 << 20).fill_(1.0)
        del b, c, d

    applied = keep_freed_memory()
    for _ in range(2):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


@glibc
def test_keep_freed_memory_stops_the_page_faults():
    """Steps that allocate, fill and free tens of megabytes page-fault on every page each time under glibc's
    defaults (fresh mmaps: ~25k faults per step here), and several times less once the process keeps its
    freed memory (1-3k here)."""
    res = {}
    for tuning in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "ATTNSCALE_MALLOC_TUNING": tuning})
        assert out.returncode == 0, out.stderr[-2000:]
        applied, faults = out.stdout.split()
        assert applied == str(tuning == "1")
        res[tuning] = float(faults)
    assert res["0"] > 20000 and res["1"] < res["0"] / 4, res


def test_opt_out(monkeypatch):
    monkeypatch.setenv("ATTNSCALE_MALLOC_TUNING", "0")
    assert malloc.keep_freed_memory() is False


@pytest.mark.parametrize("module,argv", [(train, ["cfg.json"]), (evaluate, ["cfg.json"]), (reproduce, ["--quick"])])
def test_entry_points_apply_it_first(monkeypatch, module, argv):
    class Called(Exception):
        pass

    def stub():
        raise Called
    monkeypatch.setattr(module, "keep_freed_memory", stub)
    with pytest.raises(Called):
        module.main(argv)
