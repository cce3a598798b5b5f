"""The digest of the C++/CUDA sources (every file under ``csrc/``) that ``attnscale._C`` is built from.

setup.py compiles it into the extension (``attnscale._C.source_hash()``), so that a build carried to
another machine (benchmarks/gpu_prebuild.sh -> gpu_proof.sh) or left over from before a change of the
sources is recognised as stale instead of serving old kernels under old schemas.  Standard library only:
setup.py loads this file by path, before torch or the package can be imported.
"""
from __future__ import annotations

import hashlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SUFFIXES = (".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp")  # sources only: no stray objects or caches


def source_hash(root: str = ROOT) -> str | None:
    """SHA-256 over ``csrc/``'s source files (relative path and bytes, in sorted path order), or None
    without a ``csrc/`` folder (an installed wheel)."""
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        return None
    paths = []
    for folder, _, files in os.walk(csrc):
        paths += [os.path.join(folder, f) for f in files if f.endswith(SUFFIXES)]
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/")):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        with open(path, "rb") as f:
            digest.update(rel.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()
