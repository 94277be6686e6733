"""Pick the instruction set, build the C++ kernels for it on first use and load them, or say why they cannot run.

The kernels come in one build per instruction set, compiled from the same sources with that set's flags
(``ISA_FLAGS``; the C++ picks its code paths from the ``GLMKIT_ISA_*`` macro): ``avx512`` needs AVX-512 with BF16 and
VNNI (Intel Sapphire Rapids, AMD Zen 4 and later), ``avx2`` AVX2 + FMA + F16C (nearly every x86-64 CPU since 2013).
The CPU is read before anything is compiled, and only its build is compiled (``torch.utils.cpp_extension.load``)
into a cache folder keyed by the source, the torch version and the flags: a fresh clone needs only
``pip install -e .`` and a C++ compiler; the first process compiles (~10-40 s), every later one loads the cached
library. ``GLMKIT_ISA=avx2|avx512`` forces a build (an AVX-512 machine can run and benchmark the AVX2 path);
``GLMKIT_KERNELS=0`` turns the kernels off. Without a compiler, off x86, or on a CPU without AVX2, ``load()``
returns False (with one warning saying why, where the user could expect the kernels) and glmkit.kernels uses the
PyTorch reference (reference.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from . import layout

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / "linear.cpp",
    CSRC / "quantized.cpp",
    CSRC / "decode.cpp",
    CSRC / "packed.cpp",
    CSRC / "prefill.cpp",
    CSRC / "train.cpp",
]
CFLAGS = ["-O3", "-std=c++20", "-fopenmp", *layout.compile_flags()]
# per instruction set: the CPU features it needs (as Linux's /proc/cpuinfo names them) and its compiler flags
ISA_FEATURES = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
}
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-mfma",
               "-mf16c", "-DGLMKIT_ISA_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DGLMKIT_ISA_AVX2"],
}  # fmt: skip

_lock = threading.Lock()
_loaded: bool | None = None
_reason: str | None = None
_isa: str | None = None
log = logging.getLogger("glmkit.kernels")


def cache_dir() -> Path:
    """``$GLMKIT_CACHE``, else ``$XDG_CACHE_HOME/glmkit``, else ``~/.cache/glmkit``."""
    if os.environ.get("GLMKIT_CACHE"):
        return Path(os.environ["GLMKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glmkit"


def cpu_features() -> set[str] | None:
    """The CPU's feature flags as Linux reports them, or None where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def best_isa(features: set[str] | None = None) -> str | None:
    """The fastest build this CPU runs (``avx512`` or ``avx2``), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if features is None:
        features = cpu_features()
    if features is None:  # no /proc/cpuinfo (macOS, Windows): what PyTorch's own dispatch found
        return "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else None
    for isa, needs in ISA_FEATURES.items():
        if all(f in features for f in needs):
            return isa
    return None


def requested_isa() -> str | None:
    """``GLMKIT_ISA`` (``avx2`` or ``avx512``), or None when unset; any other value is an error."""
    value = os.environ.get("GLMKIT_ISA", "").strip().lower()
    if value and value not in ISA_FLAGS:
        raise ValueError(f"GLMKIT_ISA={value!r}: expected one of {', '.join(sorted(ISA_FLAGS))} (or unset)")
    return value or None


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


def isa() -> str | None:
    """The instruction set of the loaded kernels (``avx512`` or ``avx2``), None where they do not run."""
    return _isa if load() else None


def _flags(isa_name: str) -> list[str]:
    return CFLAGS + ISA_FLAGS[isa_name]


def _build_dir(isa_name: str) -> Path:
    source = b"".join(p.read_bytes() for p in [*SOURCES, *sorted(CSRC.glob("*.h"))])
    tag = hashlib.sha256(source + torch.__version__.encode() + " ".join(_flags(isa_name)).encode()).hexdigest()[:12]
    return cache_dir() / f"glmkit_kernels_{isa_name}_{tag}"


def _compile(isa_name: str, build_dir: Path) -> None:
    """Compile and load the library from a private folder, then rename that into place: a build killed midway leaves
    no half-built library and no lock behind, and processes that build at once each finish (the first rename wins;
    later processes load the library without running the compiler)."""
    from torch.utils.cpp_extension import load as load_extension

    log.info("building glmkit's C++ kernels for %s in %s (once per source version; ~10-40 s)", isa_name, build_dir)
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{build_dir.name}-", dir=build_dir.parent))
    try:
        load_extension(
            name=build_dir.name,
            sources=[str(p) for p in SOURCES],
            extra_cflags=_flags(isa_name),
            build_directory=str(staging),
            is_python_module=False,
            verbose=False,
        )
        try:
            staging.rename(build_dir)
        except OSError:  # another process got there first (or a stale, incomplete folder is in the way)
            if not (build_dir / f"{build_dir.name}.so").exists():
                shutil.rmtree(build_dir, ignore_errors=True)
                staging.rename(build_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _warn(reason: str) -> None:
    warnings.warn(f"glmkit.kernels: {reason}; using the slower PyTorch reference", stacklevel=4)


def _try_load() -> str | None:
    global _isa
    if os.environ.get("GLMKIT_KERNELS", "1") == "0":
        return "disabled by GLMKIT_KERNELS=0"
    forced, best = requested_isa(), best_isa()
    if best is None:
        reason = f"this CPU ({platform.machine()}) has no AVX2 + FMA + F16C"
        if platform.machine().lower() in ("x86_64", "amd64"):
            _warn(reason)
        return reason
    if forced == "avx512" and best != "avx512":
        reason = "GLMKIT_ISA=avx512 but this CPU lacks AVX-512 BF16 / VNNI"
        _warn(reason)
        return reason
    isa_name = forced or best
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        reason = f"no C++ compiler ({compiler}) on PATH"
        _warn(reason)
        return reason
    build_dir = _build_dir(isa_name)
    library = build_dir / f"{build_dir.name}.so"
    try:
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            _compile(isa_name, build_dir)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
        reason = f"could not build the C++ kernels in {build_dir}: {str(e).strip().splitlines()[-1][:300]}"
        _warn(reason)
        return reason
    if not torch.ops.glmkit_kernels.supported():  # the CPU's own word, in case /proc/cpuinfo misled us
        reason = f"this CPU cannot run the {isa_name} kernels"
        _warn(reason)
        return reason
    from . import ops, training

    ops.register_fakes()
    training.register_fakes()
    _isa = isa_name
    return None
