"""glmkit.kernels.build: the instruction set is read from the CPU before anything is compiled, ``GLMKIT_ISA`` forces
one (an unknown value is an error naming the allowed ones), and wherever a build runs (x86-64 with AVX2 and a
compiler) the kernels do run: a broken build can never hide behind the PyTorch fallback."""

import os
import platform
import shutil
import subprocess
import sys

import pytest

from glmkit import kernels
from glmkit.kernels import build

AVX512_CPU = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"}
ZEN3_CPU = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}


def test_the_build_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert build.best_isa(AVX512_CPU) == "avx512"
    assert build.best_isa(AVX512_CPU - {"avx512_bf16"}) == "avx2"  # Skylake-X / Ice Lake: AVX-512 without BF16
    assert build.best_isa(ZEN3_CPU) == "avx2"
    assert build.best_isa({"sse4_2", "avx"}) is None  # Sandy Bridge: the reference path
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert build.best_isa(AVX512_CPU) is None
    assert build.ISA_FEATURES.keys() == build.ISA_FLAGS.keys()


def test_glmkit_isa_is_checked(monkeypatch):
    for value, expected in (("", None), ("AVX2", "avx2"), ("avx512", "avx512")):
        monkeypatch.setenv("GLMKIT_ISA", value)
        assert build.requested_isa() == expected
    monkeypatch.setenv("GLMKIT_ISA", "avx3")
    with pytest.raises(ValueError, match=r"GLMKIT_ISA='avx3': expected one of avx2, avx512"):
        build.requested_isa()


def test_the_kernels_run_wherever_they_can():
    if os.environ.get("GLMKIT_KERNELS") == "0":
        assert not kernels.available() and kernels.unavailable_reason() == "disabled by GLMKIT_KERNELS=0"
        return
    expected = build.requested_isa() or build.best_isa()
    if expected is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        assert not kernels.available() and kernels.unavailable_reason()
        return
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.isa() == expected


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code], env={**os.environ, **env}, capture_output=True, text=True
    )


def test_a_cpu_without_the_forced_set_gets_the_reference_with_one_warning():
    if build.best_isa() == "avx512":
        pytest.skip("this CPU runs the AVX-512 build (scripts/check_kernel_paths.sh runs GLMKIT_ISA=avx2 here)")
    code = "from glmkit import kernels; print(kernels.available(), kernels.unavailable_reason())"
    out = _run(code, GLMKIT_ISA="avx512", GLMKIT_KERNELS="1")
    assert out.returncode == 0, out.stderr
    assert "False GLMKIT_ISA=avx512 but this CPU lacks AVX-512 BF16 / VNNI" in out.stdout
    assert out.stderr.count("using the slower PyTorch reference") == 1


def test_a_wrong_glmkit_isa_is_one_clear_cli_error():
    out = subprocess.run(
        [sys.executable, "-m", "glmkit", "generate", "In the beginning [MASK]", "--max-new-tokens", "2"],
        env={**os.environ, "GLMKIT_ISA": "sse9", "GLMKIT_KERNELS": "1"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "GLMKIT_ISA='sse9': expected one of avx2, avx512" in out.stderr
