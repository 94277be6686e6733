// What the GEMV kernels of linear.cpp (bf16, fp32) and quantized.cpp (int8, int4) share: the activation
// conversions, the final reduction of a row's accumulators, and the driver that hands blocks of weight rows to
// threads and writes the outputs (run_rows / launch).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <vector>

#include "simd.h"

namespace glmkit::gemv {

constexpr int MT = 4;  // activation rows per pass over a weight row
constexpr int64_t RB = 16;  // weight rows per block (run_rows)
#if defined(GLMKIT_ISA_AVX512)
constexpr int U = 4;  // independent accumulators per activation row (hides the dot-product latency)
#else
constexpr int U = 2;  // AVX2 has 16 registers: MT x U accumulators and the loaded vectors must fit
#endif
constexpr int TR = 4;  // weight rows per bf16 tile (tile_bf16)
constexpr int64_t TILE_MIN_ROWS = 8;  // activation rows from which tiles beat row-by-row GEMV (2-4 rows: 15-25 % slower)
// Bytes of the weight stream each row kernel requests ahead of its loads. The hardware prefetcher alone leaves a
// thread's stream through one of a decode step's 1-8 MB matrices short of the bandwidth: 4 KiB ahead made the fused
// GLM-Large step 4-6 % (bf16) and 7-10 % (int8) faster; the integer kernels, which read fewer bytes per instruction,
// gain another 6-10 % at 8 KiB in the fast-bandwidth state (benchmarks/RESULTS.md). Past a thread's last row the
// requests touch rows it does not read (prefetches never fault).
constexpr int64_t PREFETCH_AHEAD = 4096;
constexpr int64_t PREFETCH_AHEAD_INT = 8192;

// the LINES 64-byte lines at AHEAD bytes past p
template <int LINES, int64_t AHEAD = PREFETCH_AHEAD>
inline void prefetch_ahead(const void* p) {
  const char* c = static_cast<const char*>(p) + AHEAD;
  for (int i = 0; i < LINES; i++) _mm_prefetch(c + 64 * i, _MM_HINT_T0);
}

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

// ---- activations -----------------------------------------------------------------------------------------------

inline void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(GLMKIT_ISA_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#else
  for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i*)(dst + i), to_bf16x8(_mm256_loadu_ps(src + i)));
#endif
  for (; i < n; i++) dst[i] = c10::BFloat16(src[i]).x;
}

inline void to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(GLMKIT_ISA_AVX512)
  for (; i + 16 <= n; i += 16) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
#else
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(reinterpret_cast<const c10::BFloat16*>(src + i)));
#endif
  for (; i < n; i++) dst[i] = static_cast<float>(c10::BFloat16(src[i], c10::BFloat16::from_bits()));
}

// x [M, K] as contiguous bf16 bits (x itself when it already is bf16)
inline at::Tensor bf16_activations(const at::Tensor& x) {
  if (x.scalar_type() == at::kBFloat16) return x.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty(xc.sizes(), xc.options().dtype(at::kBFloat16));
  to_bf16(xc.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()), xc.numel());
  return out;
}

inline at::Tensor f32_activations(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  to_f32(reinterpret_cast<const uint16_t*>(xc.data_ptr()), out.data_ptr<float>(), xc.numel());
  return out;
}


// ---- one weight row against NM activation rows: out[m] = dot(w, x[m]) ------------------------------------------

#if defined(GLMKIT_ISA_AVX512)
using vfloat = __m512;
inline float reduce_add(__m512 v) { return _mm512_reduce_add_ps(v); }
inline __m512 vadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
#else
using vfloat = __m256;
inline float reduce_add(__m256 v) { return hsum(v); }
inline __m256 vadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
#endif

template <int NM>
inline void reduce_rows(const vfloat (&acc)[NM][U], float* out) {
  for (int m = 0; m < NM; m++) {
    vfloat a = vadd(acc[m][0], acc[m][1]);
    for (int u = 2; u < U; u++) a = vadd(a, acc[m][u]);
    out[m] = reduce_add(a);
  }
}


// ---- int4 group sizes (glmkit/kernels/layout.py INT4_GROUP_SIZES) ----------------------------------------------

#define GLMKIT_TEXT_(...) #__VA_ARGS__
#define GLMKIT_TEXT(...) GLMKIT_TEXT_(__VA_ARGS__)
constexpr int INT4_GROUPS[] = {GLMKIT_INT4_GROUP_SIZES};
constexpr const char* INT4_GROUPS_TEXT = GLMKIT_TEXT(GLMKIT_INT4_GROUP_SIZES);
static_assert([] {
  for (int g : INT4_GROUPS)
    if (g % 32) return false;
  return true;
}(), "int4 groups must be whole 32-input chunks: the packed layout's last chunk of 32 is one group");

inline bool int4_group_supported(int64_t g) {
  return std::find(std::begin(INT4_GROUPS), std::end(INT4_GROUPS), g) != std::end(INT4_GROUPS);
}

// calls f.template operator()<G>() with the supported group size g known at compile time
template <size_t I = 0, typename F>
void dispatch_group(int64_t g, const F& f) {
  if constexpr (I < std::size(INT4_GROUPS)) {
    if (g == INT4_GROUPS[I]) return f.template operator()<INT4_GROUPS[I]>();
    dispatch_group<I + 1>(g, f);
  }
}


// ---- driver: rows over threads, activation rows MT at a time -----------------------------------------------------

// calls f.template operator()<NM>() with NM = min(nm, MAX) known at compile time (nm >= 1)
template <int MAX, int NM = 1, typename F>
void dispatch_upto(int nm, const F& f) {
  if constexpr (NM == MAX) {
    f.template operator()<NM>();
  } else {
    if (nm == NM) return f.template operator()<NM>();
    dispatch_upto<MAX, NM + 1>(nm, f);
  }
}

template <typename F>
void dispatch_rows(int nm, const F& f) {
  dispatch_upto<MT>(nm, f);
}

// row(n, m0, nm, out, scratch) writes dot(w[n + r], x[m0 + i]) to out[r * MT + i] for r < R (R divides N and RB);
// scratch: `scratch` floats of row n's own, kept across the passes over its block (a block's rows have consecutive
// scratch). Blocks of RB rows go to threads; within one, each weight row stays in L1 while it meets every tile of
// MT activation rows (for M <= MT: one pass, row after row).
template <typename Row, typename Finish, typename Out>
void run_rows(int64_t M, int64_t N, int64_t R, int64_t scratch, Out* y, const Row& row, const Finish& finish) {
  at::parallel_for(0, (N + RB - 1) / RB, 1, [&](int64_t b0, int64_t b1) {
    float out[TR * MT];
    std::vector<float> buf(RB * scratch);
    for (int64_t b = b0; b < b1; b++) {
      const int64_t n0 = b * RB, n1 = std::min(N, n0 + RB);
      for (int64_t n = n0; n < n1; n += R) {
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
          const int nm = static_cast<int>(std::min<int64_t>(MT, M - m0));
          row(n, m0, nm, out, buf.data() + (n - n0) * scratch);
          for (int64_t r = 0; r < R; r++)
            for (int i = 0; i < nm; i++) y[(m0 + i) * N + n + r] = Out(finish(m0 + i, n + r, out[r * MT + i]));
        }
      }
    }
  });
}

inline void check_common(const at::Tensor& x, const at::Tensor& w, int64_t K, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "glmkit kernels: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x: expected [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->is_contiguous(), "bias: expected [N]");
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16, "bias: f32/bf16");
  }
}

inline void check_scales(const at::Tensor& scales) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16, "scales: f32/bf16");
}

// y = finish(dot) [+ bias], written in x's dtype; R weight rows per row() call (run_rows)
template <typename Row, typename Finish>
at::Tensor launch(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, int64_t scratch,
                  const Row& row, const Finish& finish, int64_t R = 1) {
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  auto with_bias = [&](auto* yp) {
    if (!bias) return run_rows(M, N, R, scratch, yp, row, finish);
    if (bias->scalar_type() == at::kFloat) {
      const float* b = bias->data_ptr<float>();
      return run_rows(M, N, R, scratch, yp, row, [&](int64_t m, int64_t n, float d) { return finish(m, n, d) + b[n]; });
    }
    const c10::BFloat16* b = bias->data_ptr<c10::BFloat16>();
    run_rows(M, N, R, scratch, yp, row, [&](int64_t m, int64_t n, float d) { return finish(m, n, d) + to_f(b[n]); });
  };
  if (x.scalar_type() == at::kFloat)
    with_bias(y.data_ptr<float>());
  else
    with_bias(y.data_ptr<c10::BFloat16>());
  return y;
}


}  // namespace glmkit::gemv
