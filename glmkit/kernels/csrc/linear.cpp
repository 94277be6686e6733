// Weight-only GEMV / small-M GEMM for decoding on x86 CPUs with AVX-512 BF16 and VNNI (glmkit.kernels).
// (fp32 weights too: the stock fp32 GEMV streams at ~18 GB/s on this CPU, row_f32 near the bandwidth.)
//
// Decoding multiplies 1..~32 activation rows by each weight matrix once per token, so it is bound by how fast the
// weights stream from memory; the stock CPU kernels reach a fraction of that (benchmarks/RESULTS.md). Here every
// weight row is read front to back as one sequential stream (interleaving several rows' streams measured ~2x slower
// from DRAM on this CPU) into U independent accumulators per activation row, against MT activation rows at a time;
// with more activation rows, each weight row meets every tile of MT rows while it is in L1 (run_rows). Blocks of RB
// rows are split over threads.
//   bf16: vdpbf16ps on the plain nn.Linear weight [N, K] (no repacking); x rounded to bf16. From 8 rows, tiles of
//         4 weight rows x 4 activation rows share their loads in registers (tile_bf16); above
//         BF16_GEMV_MAX_ROWS bf16 rows oneDNN's blocked GEMM takes over.
//   AVX2 (no AVX-512): the same rows, bf16 widened to fp32 by a shift and FMA'd (row_bf16 below); above
//         BF16_GEMV_MAX_ROWS, oneDNN's fp32 GEMM on a widened copy of the weight.
// int8 / int4: quantized.cpp; the shared driver: gemv.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gemv.h"
#include "linear.h"
#include "simd.h"

namespace {

using namespace glmkit::gemv;

#if defined(GLMKIT_ISA_AVX512)

template <int NM>
void row_bf16(const uint16_t* w, int64_t K, const uint16_t* x, float* out) {
  __m512 acc[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    prefetch_ahead<U>(w + k);
    __m512bh wv[U];
    for (int u = 0; u < U; u++) wv[u] = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
    for (int m = 0; m < NM; m++)
      for (int u = 0; u < U; u++)
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv[u], (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u));
  }
  for (; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32)((1u << (K - k)) - 1);
    __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < NM; m++)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k));
  }
  reduce_rows<NM>(acc, out);
}

template <int NM>
void row_f32(const float* w, int64_t K, const float* x, float* out) {
  __m512 acc[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    prefetch_ahead<U>(w + k);
    __m512 wv[U];
    for (int u = 0; u < U; u++) wv[u] = _mm512_loadu_ps(w + k + 16 * u);
    for (int m = 0; m < NM; m++)
      for (int u = 0; u < U; u++) acc[m][u] = _mm512_fmadd_ps(wv[u], _mm512_loadu_ps(x + m * K + k + 16 * u), acc[m][u]);
  }
  for (; k < K; k += 16) {
    const __mmask16 mask = glmkit::tail(K, k);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, w + k);
    for (int m = 0; m < NM; m++) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * K + k), acc[m][0]);
  }
  reduce_rows<NM>(acc, out);
}

template <bool MASKED>
inline __m512bh load_bh(const uint16_t* p, __mmask32 mask) {
  if constexpr (MASKED) return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
  return (__m512bh)_mm512_loadu_si512(p);
}

// acc[m * TR + r] += w[r][k:k+32] . x[m][k:k+32] (masked); pf: rows to prefetch into L2 (or null). The loops must be
// fully unrolled: otherwise GCC 12 keeps acc in memory and stores all of it every iteration (measured 2.5x slower).
template <int NM, bool MASKED>
inline void tile_step(__m512* acc, const uint16_t* w, int64_t K, const uint16_t* x, int64_t k, __mmask32 mask,
                             const uint16_t* pf) {
  if (pf)
#pragma GCC unroll 4
    for (int r = 0; r < TR; r++) _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T1);
  __m512bh xv[NM];
#pragma GCC unroll 4
  for (int m = 0; m < NM; m++) xv[m] = load_bh<MASKED>(x + m * K + k, mask);
#pragma GCC unroll 4
  for (int r = 0; r < TR; r++) {
    const __m512bh wv = load_bh<MASKED>(w + r * K + k, mask);
#pragma GCC unroll 4
    for (int m = 0; m < NM; m++) acc[m * TR + r] = _mm512_dpbf16_ps(acc[m * TR + r], wv, xv[m]);
  }
}

// y[m][r] = dot(w[r], x[m]) (+ bias[r]) for TR consecutive weight rows (stride K) and NM activation rows; y: row
// stride N, fp32 or bf16 bits. Each weight vector meets NM activation vectors in registers (8 loads per 16 products,
// where row_bf16 needs 20), and the epilogue is vector code (it was a quarter of a tile's time as scalar code).
template <int NM, typename Out>
void tile_bf16(const uint16_t* w, int64_t K, const uint16_t* x, const uint16_t* pf, const float* bias, Out* y,
                      int64_t N) {
  static_assert(TR * MT == 16, "sum16 reduces a TR x MT tile");
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) tile_step<NM, false>(acc, w, K, x, k, 0, pf);
  if (k < K) tile_step<NM, true>(acc, w, K, x, k, (__mmask32)((1u << (K - k)) - 1), pf);
  __m512 v = glmkit::sum16(acc);  // lane m * TR + r
  if (bias) v = _mm512_add_ps(v, _mm512_broadcast_f32x4(_mm_loadu_ps(bias)));
  if constexpr (sizeof(Out) == 4) {
    alignas(64) float t[16];
    _mm512_store_ps(t, v);
    for (int m = 0; m < NM; m++) std::copy(t + m * TR, t + (m + 1) * TR, reinterpret_cast<float*>(y) + m * N);
  } else {
    alignas(32) uint16_t t[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), (__m256i)_mm512_cvtneps_pbh(v));
    for (int m = 0; m < NM; m++) std::copy(t + m * TR, t + (m + 1) * TR, reinterpret_cast<uint16_t*>(y) + m * N);
  }
}

// x: int16 fixed point; blocks of 4096 inputs keep the int32 sums exact (|q| <= 128, |x| <= 32767)
// y [M, N] = x [M, K] @ w [N, K]^T (+ bias) in tiles (N % TR == 0); blocks of RB weight rows over threads. The first
// pass over a block's rows fetches the next block's into L2, so the passes of later activation rows compute from
// cache instead of waiting for DRAM (M = 32: 15 % faster).
template <typename Out>
void run_tiles_bf16(const uint16_t* wp, const uint16_t* xp, const float* bias, int64_t M, int64_t N, int64_t K,
                    Out* y) {
  at::parallel_for(0, (N + RB - 1) / RB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t n = b0 * RB; n < std::min(N, b1 * RB); n += TR)
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int nm = static_cast<int>(std::min<int64_t>(MT, M - m0));
        const uint16_t* pf = m0 == 0 && n + RB < N ? wp + (n + RB) * K : nullptr;
        const float* b = bias ? bias + n : nullptr;
        dispatch_rows(nm, [&]<int NM>() { tile_bf16<NM>(wp + n * K, K, xp + m0 * K, pf, b, y + m0 * N + n, N); });
      }
  });
}

#else  // AVX2: bf16 widens to fp32 by a 16-bit shift (even elements) and a mask (odd ones), then FMA

// the 16 bf16 at p as fp32: elements 0, 2, .., 14 in even, 1, 3, .., 15 in odd (the same split for w and x, so
// their products pair up)
inline void widen16(const uint16_t* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000))));
}

inline void widen16(const uint16_t* p, int64_t n, __m256& even, __m256& odd) {
  alignas(32) uint16_t t[16] = {};
  std::copy(p, p + n, t);
  widen16(t, even, odd);
}

// separate accumulators for the even and the odd elements, so that each FMA chain takes one FMA per step (AVX2's
// 16 registers hold U pairs per activation row for up to 2 rows, one pair for more)
template <int NM>
void row_bf16(const uint16_t* w, int64_t K, const uint16_t* x, float* out) {
  constexpr int UA = NM <= 2 ? U : 1;
  __m256 even[NM][U], odd[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) even[m][u] = odd[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    prefetch_ahead<U / 2>(w + k);
    __m256 we[U], wo[U];
    for (int u = 0; u < U; u++) widen16(w + k + 16 * u, we[u], wo[u]);
    for (int m = 0; m < NM; m++)
      for (int u = 0; u < U; u++) {
        __m256 xe, xo;
        widen16(x + m * K + k + 16 * u, xe, xo);
        even[m][u % UA] = _mm256_fmadd_ps(we[u], xe, even[m][u % UA]);
        odd[m][u % UA] = _mm256_fmadd_ps(wo[u], xo, odd[m][u % UA]);
      }
  }
  for (; k < K; k += 16) {
    const int64_t n = std::min<int64_t>(16, K - k);
    __m256 we, wo;
    widen16(w + k, n, we, wo);
    for (int m = 0; m < NM; m++) {
      __m256 xe, xo;
      widen16(x + m * K + k, n, xe, xo);
      even[m][0] = _mm256_fmadd_ps(we, xe, even[m][0]);
      odd[m][0] = _mm256_fmadd_ps(wo, xo, odd[m][0]);
    }
  }
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) even[m][u] = u < UA ? _mm256_add_ps(even[m][u], odd[m][u]) : _mm256_setzero_ps();
  reduce_rows<NM>(even, out);
}

template <int NM>
void row_f32(const float* w, int64_t K, const float* x, float* out) {
  __m256 acc[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    prefetch_ahead<U>(w + k);
    __m256 wv[2 * U];
    for (int u = 0; u < 2 * U; u++) wv[u] = _mm256_loadu_ps(w + k + 8 * u);
    for (int m = 0; m < NM; m++)
      for (int u = 0; u < 2 * U; u++)
        acc[m][u % U] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u % U]);
  }
  for (; k < K; k += 8) {
    const __m256 wv = glmkit::load8(w + k, K - k);
    for (int m = 0; m < NM; m++) acc[m][0] = _mm256_fmadd_ps(wv, glmkit::load8(x + m * K + k, K - k), acc[m][0]);
  }
  reduce_rows<NM>(acc, out);
}

#endif

}  // namespace

// ---- ops -------------------------------------------------------------------------------------------------------

namespace glmkit {

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2, "weight: expected bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  check_common(x, w, K, bias);
#if defined(GLMKIT_ISA_AVX512)
  if (x.scalar_type() == at::kBFloat16 && x.size(0) > BF16_GEMV_MAX_ROWS) return at::linear(x, w, bias);
#else
  // without AVX-512 BF16, oneDNN's bf16 GEMM runs at a fifth of its fp32 GEMM here: widen the weight once (O(N K)
  // against the GEMM's O(M N K)) and take the fp32 GEMM, x rounded to bf16 first as on every other path
  if (x.scalar_type() == at::kBFloat16 && x.size(0) > BF16_GEMV_MAX_ROWS)
    return at::linear(x.to(at::kFloat), w.to(at::kFloat), bias ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : bias)
        .to(at::kBFloat16);
#endif
  auto xb = bf16_activations(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const int64_t M = x.size(0);
#if defined(GLMKIT_ISA_AVX512)
  if (M >= TILE_MIN_ROWS && N % TR == 0) {
    const at::Tensor b32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    auto y = at::empty({M, N}, x.options());
    const float* bp = bias ? b32.data_ptr<float>() : nullptr;
    if (x.scalar_type() == at::kFloat)
      run_tiles_bf16(wp, xp, bp, M, N, K, y.data_ptr<float>());
    else
      run_tiles_bf16(wp, xp, bp, M, N, K, reinterpret_cast<uint16_t*>(y.data_ptr()));
    return y;
  }
#endif
  auto finish = [](int64_t, int64_t, float d) { return d; };
  auto row = [&](int64_t n, int64_t m0, int nm, float* out, float*) {
    dispatch_rows(nm, [&]<int NM>() { row_bf16<NM>(wp + n * K, K, xp + m0 * K, out); });
  };
  return launch(x, N, bias, 0, row, finish);
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2, "weight: expected float32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  check_common(x, w, K, bias);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x: float32 with a float32 weight");
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  auto row = [&](int64_t n, int64_t m0, int nm, float* out, float*) {
    dispatch_rows(nm, [&]<int NM>() { row_f32<NM>(wp + n * K, K, xp + m0 * K, out); });
  };
  return launch(x, N, bias, 0, row, [](int64_t, int64_t, float d) { return d; });
}

}  // namespace glmkit


TORCH_LIBRARY(glmkit_kernels, m) {
  m.def("supported() -> bool");
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scales, int group_size, Tensor? bias) -> Tensor");
  m.def("linear_int4x16(Tensor x, Tensor w, Tensor scales, int group_size, Tensor? bias) -> Tensor");
  m.def(
      "decode_blocks(Tensor x, Tensor[] tensors, int[] linear_meta, Tensor(a!) k_cache, Tensor(b!) v_cache, int[] slots, "
      "int[] lengths, Tensor? rope, int n_head, float eps, str activation, bool qkv_per_head, int rope_halves, "
      "float residual_alpha) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("norm(Tensor x, Tensor w, Tensor? b, float eps) -> Tensor");
  m.def("pack_bf16(Tensor w) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool bf16_out) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("linear_packed_bf16(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.impl("supported", &glmkit::cpu_supported);
}

TORCH_LIBRARY_IMPL(glmkit_kernels, CPU, m) {
  m.impl("linear_bf16", &glmkit::linear_bf16);
  m.impl("linear_f32", &glmkit::linear_f32);
  m.impl("linear_int8", &glmkit::linear_int8);
  m.impl("linear_int4", &glmkit::linear_int4);
  m.impl("linear_int4x16", &glmkit::linear_int4x16);
  m.impl("decode_blocks", &glmkit::decode_blocks);
  m.impl("gelu_tanh", &glmkit::gelu_tanh_bf16);
  m.impl("norm", &glmkit::norm_bf16);
  m.impl("pack_bf16", &glmkit::pack_bf16);
  m.impl("attention", &glmkit::attention);
  m.impl("rotary", &glmkit::rotary);
  m.impl("linear_packed_bf16", &glmkit::linear_packed_bf16);
}
