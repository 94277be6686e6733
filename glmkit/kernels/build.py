"""Build the C++ kernels on first use and load them, or say why they cannot run.

The extension is compiled just in time (``torch.utils.cpp_extension.load``) into a cache folder keyed by the source,
the torch version and the flags, so a fresh clone needs only ``pip install -e .`` and a C++ compiler: the first
process compiles (~10-20 s), every later one loads the cached library. Without a compiler, on a CPU without
AVX-512 BF16 / VNNI, off x86, or with ``GLMKIT_KERNELS=0``, ``load()`` returns False and glmkit.kernels uses the
PyTorch reference (reference.py).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / "linear.cpp",
    CSRC / "quantized.cpp",
    CSRC / "decode.cpp",
    CSRC / "packed.cpp",
    CSRC / "prefill.cpp",
    CSRC / "train.cpp",
]
CFLAGS = ["-O3", "-std=c++20", "-fopenmp"]

_lock = threading.Lock()
_loaded: bool | None = None
_reason: str | None = None


def cache_dir() -> Path:
    """``$GLMKIT_CACHE``, else ``$XDG_CACHE_HOME/glmkit``, else ``~/.cache/glmkit``."""
    if os.environ.get("GLMKIT_CACHE"):
        return Path(os.environ["GLMKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glmkit"


def load() -> bool:
    """Whether the kernels run here; builds and loads them on the first call (thread-safe)."""
    global _loaded, _reason
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _reason = _try_load()
                _loaded = _reason is None
    return _loaded


def unavailable_reason() -> str | None:
    """Why ``load()`` returned False (``None`` when the kernels run)."""
    load()
    return _reason


def _try_load() -> str | None:
    if os.environ.get("GLMKIT_KERNELS", "1") == "0":
        return "disabled by GLMKIT_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are written for x86-64 AVX-512, this machine is {platform.machine()}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    source = b"".join(p.read_bytes() for p in [*SOURCES, *sorted(CSRC.glob("*.h"))])
    tag = hashlib.sha256(source + torch.__version__.encode() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    name = f"glmkit_kernels_{tag}"
    build_dir = cache_dir() / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load as load_extension

        load_extension(
            name=name,
            sources=[str(p) for p in SOURCES],
            extra_cflags=CFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
        reason = f"could not build the C++ kernels in {build_dir}: {str(e).strip().splitlines()[-1][:300]}"
        warnings.warn(f"glmkit.kernels: {reason}; using the slower PyTorch reference", stacklevel=3)
        return reason
    if not torch.ops.glmkit_kernels.supported():
        return "this CPU lacks AVX-512 BF16 / VNNI"
    from . import ops, training

    ops.register_fakes()
    training.register_fakes()
    return None
