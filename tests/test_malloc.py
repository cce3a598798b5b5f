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

    def faults_per_round():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            t = torch.empty(16 << 20)  # 64 MB
            t.fill_(1.0)
            del t
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8

    default = faults_per_round()
    applied = keep_freed_memory()
    faults_per_round()  # the first round grows the heap
    print(default, applied, faults_per_round())
""")


@glibc
def test_keep_freed_memory_stops_the_page_faults():
    """A 64 MB tensor allocated, filled and freed in a loop page-faults on every page each time under glibc's
    defaults (a fresh mmap), and hardly ever once the process keeps its freed memory."""
    out = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ATTNSCALE_MALLOC_TUNING": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    default, applied, tuned = out.stdout.split()
    assert applied == "True"
    assert float(default) > 8000 and float(tuned) < float(default) / 20, out.stdout


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
