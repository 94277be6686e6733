#!/usr/bin/env bash
# The kernel-equivalence tests once more on the paths this CPU's default run does not take: the PyTorch reference
# (GLMKIT_KERNELS=0) everywhere, and the AVX2 build (GLMKIT_ISA=avx2) on a CPU that runs the AVX-512 one, so that
# neither can rot whichever CPU CI lands on. Part of the README's test command (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=(
  tests/test_kernels.py tests/test_kernel_build.py tests/test_quantize.py tests/test_prefill_kernels.py
  tests/test_generate_fast.py tests/test_train_kernels.py tests/test_kernel_fakes.py tests/serve/test_engine.py
  tests/test_chatglm2_fused.py tests/test_chatglm6b_fused.py
)
GLMKIT_KERNELS=0 pytest -q "${TESTS[@]}"
if python -c "import sys; from glmkit.kernels import build; sys.exit(build.best_isa() != 'avx512')"; then
  GLMKIT_ISA=avx2 pytest -q "${TESTS[@]}"
fi
