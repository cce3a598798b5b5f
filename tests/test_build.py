"""The extension records the sources it was built from (attnscale.source_hash, compiled in by setup.py), so that
a stale build (one carried to the GPU machines, or left from before a change of csrc/) is recognised."""
import pytest

import attnscale.source_hash as sh
from attnscale.ops import has_extension
from attnscale.ops._ext import stale_build

pytestmark = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")


def test_extension_is_built_from_this_checkout():
    assert stale_build() is None, stale_build()


def test_a_stale_build_is_named(monkeypatch, tmp_path):
    """Another csrc/ (here: a copy with one byte changed) gives another digest, and stale_build says to rebuild."""
    (tmp_path / "csrc" / "ops").mkdir(parents=True)
    (tmp_path / "csrc" / "ops" / "a.cpp").write_text("int a = 1;\n")
    first = sh.source_hash(str(tmp_path))
    (tmp_path / "csrc" / "ops" / "a.cpp").write_text("int a = 2;\n")
    assert sh.source_hash(str(tmp_path)) != first and len(first) == 64
    assert sh.source_hash(str(tmp_path / "nowhere")) is None
    (tmp_path / "csrc" / "ops" / "a.o").write_bytes(b"\0")  # a stray build product does not count
    second = sh.source_hash(str(tmp_path))
    (tmp_path / "csrc" / "ops" / "a.o").unlink()
    assert sh.source_hash(str(tmp_path)) == second
    monkeypatch.setattr(sh, "source_hash", lambda root=sh.ROOT: first)
    why = stale_build()
    assert why is not None and "rebuild it" in why and first[:12] in why
