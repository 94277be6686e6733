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
//   int8: sign-extend to int16 and vpdpwssd against x held as int16 fixed point per row (finer than bf16):
//         exact integer products, summed in int32 over blocks of 4096 inputs, then in fp32; one scale per row.
//   int4: nibbles become bf16 (128 + u) by OR-ing an exponent in, then vdpbf16ps against bf16 x; each group's
//         accumulator starts at -136/16 of the group's activation sum, so the 128 + 8 offset costs nothing in the
//         loop: y = sum_g s_g * (dot(128 + u, x)_g - 136 * sum(x)_g) = sum_g s_g * dot(u - 8, x)_g.
// int4 layout (glmkit/kernels/reference.py): per row, chunks of 64 inputs, byte j = e[j] | e[j + 32] << 4; a final
// chunk of 32 inputs (K % 64 == 32) packs byte j = e[j] | e[j + 16] << 4. Stored nibble u = q + 8.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "linear.h"
#include "simd.h"

namespace {

constexpr int MT = 4;  // activation rows per pass over a weight row
constexpr int64_t RB = 16;  // weight rows per block (run_rows)
constexpr int U = 4;   // independent accumulators per activation row (hides the dot-product latency)
constexpr int TR = 4;  // weight rows per bf16 tile (tile_bf16)
constexpr int64_t TILE_MIN_ROWS = 8;  // activation rows from which tiles beat row-by-row GEMV (2-4 rows: 15-25 % slower)

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
}

// ---- activations -----------------------------------------------------------------------------------------------

KERNEL void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  for (; i < n; i++) dst[i] = c10::BFloat16(src[i]).x;
}

KERNEL void to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
  for (; i < n; i++) dst[i] = static_cast<float>(c10::BFloat16(src[i], c10::BFloat16::from_bits()));
}

// x [M, K] as contiguous bf16 bits (x itself when it already is bf16)
at::Tensor bf16_activations(const at::Tensor& x) {
  if (x.scalar_type() == at::kBFloat16) return x.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty(xc.sizes(), xc.options().dtype(at::kBFloat16));
  to_bf16(xc.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()), xc.numel());
  return out;
}

at::Tensor f32_activations(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.contiguous();
  auto xc = x.contiguous();
  auto out = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  to_f32(reinterpret_cast<const uint16_t*>(xc.data_ptr()), out.data_ptr<float>(), xc.numel());
  return out;
}

// rows of x [M, K] (fp32) as int16 fixed point: x[m] ~ q[m] * step[m], step = max|x[m]| / 32767
KERNEL void to_i16_rows(const float* x, int64_t M, int64_t K, int16_t* q, float* step) {
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    __m512 vmax = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
    float amax = _mm512_reduce_max_ps(vmax);
    for (; k < K; k++) amax = std::max(amax, std::abs(xr[k]));
    step[m] = amax > 0.f ? amax / 32767.f : 1.f;
    const float inv = 1.f / step[m];
    for (k = 0; k + 16 <= K; k += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), _mm512_set1_ps(inv)));  // nearest even
      _mm256_storeu_si256((__m256i*)(q + m * K + k), _mm512_cvtsepi32_epi16(v));
    }
    for (; k < K; k++) q[m * K + k] = static_cast<int16_t>(std::clamp(std::nearbyint(xr[k] * inv), -32767.f, 32767.f));
  }
}

// off[m * ng + g] = -136 / 16 * (sum of the bf16 activations x[m] over group g)
KERNEL void group_offsets(const uint16_t* x, int64_t M, int64_t K, int64_t G, float* off) {
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);  // bf16 1.0
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < K / G; g++) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(x + m * K + k), ones);
      off[m * (K / G) + g] = -136.f / 16.f * _mm512_reduce_add_ps(a);
    }
}

// ---- one weight row against NM activation rows: out[m] = dot(w, x[m]) ------------------------------------------

template <int NM>
KERNEL inline void reduce_rows(const __m512 (&acc)[NM][U], float* out) {
  for (int m = 0; m < NM; m++) {
    __m512 a = _mm512_add_ps(acc[m][0], acc[m][1]);
    for (int u = 2; u < U; u++) a = _mm512_add_ps(a, acc[m][u]);
    out[m] = _mm512_reduce_add_ps(a);
  }
}

template <int NM>
KERNEL void row_bf16(const uint16_t* w, int64_t K, const uint16_t* x, float* out) {
  __m512 acc[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
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
KERNEL void row_f32(const float* w, int64_t K, const float* x, float* out) {
  __m512 acc[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
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
KERNEL inline __m512bh load_bh(const uint16_t* p, __mmask32 mask) {
  if constexpr (MASKED) return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
  return (__m512bh)_mm512_loadu_si512(p);
}

// acc[m * TR + r] += w[r][k:k+32] . x[m][k:k+32] (masked); pf: rows to prefetch into L2 (or null). The loops must be
// fully unrolled: otherwise GCC 12 keeps acc in memory and stores all of it every iteration (measured 2.5x slower).
template <int NM, bool MASKED>
KERNEL inline void tile_step(__m512* acc, const uint16_t* w, int64_t K, const uint16_t* x, int64_t k, __mmask32 mask,
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
KERNEL void tile_bf16(const uint16_t* w, int64_t K, const uint16_t* x, const uint16_t* pf, const float* bias, Out* y,
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
template <int NM>
KERNEL void row_int8(const int8_t* w, int64_t K, const int16_t* x, float* out) {
  __m512 acc[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 4096) {
    const int64_t k1 = std::min<int64_t>(K, k0 + 4096);
    __m512i iacc[NM][U];
    for (int m = 0; m < NM; m++)
      for (int u = 0; u < U; u++) iacc[m][u] = _mm512_setzero_si512();
    int64_t k = k0;
    for (; k + 32 * U <= k1; k += 32 * U) {
      __m512i wv[U];
      for (int u = 0; u < U; u++)
        wv[u] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + k + 32 * u)));
      for (int m = 0; m < NM; m++)
        for (int u = 0; u < U; u++)
          iacc[m][u] = _mm512_dpwssd_epi32(iacc[m][u], wv[u], _mm512_loadu_si512(x + m * K + k + 32 * u));
    }
    for (; k < k1; k += 32) {
      const __mmask32 mask = k1 - k >= 32 ? ~__mmask32(0) : (__mmask32)((1u << (k1 - k)) - 1);
      __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + k));
      for (int m = 0; m < NM; m++)
        iacc[m][0] = _mm512_dpwssd_epi32(iacc[m][0], wv, _mm512_maskz_loadu_epi16(mask, x + m * K + k));
    }
    for (int m = 0; m < NM; m++)
      for (int u = 0; u < U; u++) acc[m][u] = _mm512_add_ps(acc[m][u], _mm512_cvtepi32_ps(iacc[m][u]));
  }
  reduce_rows<NM>(acc, out);
}

// 64 packed inputs (32 bytes) as two vectors of bf16 (128 + u): inputs 0..31 and 32..63
KERNEL inline void unpack64(const uint8_t* p, __m512bh& lo, __m512bh& hi) {
  const __m512i low = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);  // bf16 0x4300 | u = 128 + u
  __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
  lo = (__m512bh)_mm512_ternarylogic_epi32(b, low, magic, 0xEA);  // (b & 0xF) | magic
  hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(b, 4), magic);
}

// 32 inputs from k (one half-chunk, in group g) into accumulator slot J: part = init + dot(128 + u, x), where init is
// the group's offset on its first half-chunk and 0 otherwise; acc += part * s[g]. The callers hand slot J the inputs
// 32 * J modulo 128 of a 128-aligned block, so "first half-chunk of its group" is known at compile time.
template <int NM, int J, int G>
KERNEL inline void int4_half(__m512 (&acc)[NM][U], __m512bh w, const uint16_t* x, int64_t K, int64_t k,
                             const float* off, const float* s) {
  const int64_t ng = K / G, g = k / G;
  const __m512 sv = _mm512_set1_ps(s[g]);
  for (int m = 0; m < NM; m++) {
    const __m512 init = (32 * J) % G == 0 ? _mm512_set1_ps(off[m * ng + g]) : _mm512_setzero_ps();
    __m512 part = _mm512_dpbf16_ps(init, w, (__m512bh)_mm512_loadu_si512(x + m * K + k));
    acc[m][J] = _mm512_fmadd_ps(part, sv, acc[m][J]);
  }
}

// s: the row's group scales as fp32; off: per activation row and group, see group_offsets
template <int NM, int G>
KERNEL void row_int4(const uint8_t* w, int64_t K, const uint16_t* x, const float* off, const float* s, float* out) {
  const int64_t K64 = K / 64 * 64;
  __m512 acc[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 128 <= K64; k += 128) {  // two chunks, four half-chunks, four accumulators
    __m512bh l0, h0, l1, h1;
    unpack64(w + k / 2, l0, h0);
    unpack64(w + k / 2 + 32, l1, h1);
    int4_half<NM, 0, G>(acc, l0, x, K, k, off, s);
    int4_half<NM, 1, G>(acc, h0, x, K, k + 32, off, s);
    int4_half<NM, 2, G>(acc, l1, x, K, k + 64, off, s);
    int4_half<NM, 3, G>(acc, h1, x, K, k + 96, off, s);
  }
  if (k < K64) {  // one more chunk
    __m512bh l0, h0;
    unpack64(w + k / 2, l0, h0);
    int4_half<NM, 0, G>(acc, l0, x, K, k, off, s);
    int4_half<NM, 1, G>(acc, h0, x, K, k + 32, off, s);
  }
  if (K64 < K) {  // a last chunk of 32 inputs (then G == 32): byte j = e[j] | e[j + 16] << 4
    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(w + K64 / 2)));
    __m256i lo = _mm256_and_si256(b, _mm256_set1_epi16(0x000F)), hi = _mm256_srli_epi16(b, 4);
    __m512i v = _mm512_or_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi16(0x4300));
    int4_half<NM, 2, G>(acc, (__m512bh)v, x, K, K64, off, s);
  }
  reduce_rows<NM>(acc, out);
}

// ---- driver: rows over threads, activation rows MT at a time -----------------------------------------------------

// calls f.template operator()<NM>() with NM = min(nm, MT) known at compile time
template <typename F>
void dispatch_rows(int nm, const F& f) {
  switch (nm) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    default: f.template operator()<4>(); break;
  }
}

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

void check_common(const at::Tensor& x, const at::Tensor& w, int64_t K, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "glmkit kernels: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x: expected [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->is_contiguous(), "bias: expected [N]");
    TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16, "bias: f32/bf16");
  }
}

void check_scales(const at::Tensor& scales) {
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

}  // namespace

// ---- ops -------------------------------------------------------------------------------------------------------

namespace glmkit {

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2, "weight: expected bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  check_common(x, w, K, bias);
  if (x.scalar_type() == at::kBFloat16 && x.size(0) > BF16_GEMV_MAX_ROWS) return at::linear(x, w, bias);
  auto xb = bf16_activations(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const int64_t M = x.size(0);
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

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "weight: expected int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  check_common(x, w, K, bias);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N && scales.is_contiguous(), "scales: expected [N]");
  check_scales(scales);
  auto xf = f32_activations(x);
  const int64_t M = x.size(0);
  std::vector<int16_t> xq(M * K);
  std::vector<float> step(M);
  to_i16_rows(xf.data_ptr<float>(), M, K, xq.data(), step.data());
  const int16_t* xp = xq.data();
  const int8_t* wp = w.data_ptr<int8_t>();
  // TR rows per call, one after another: a 1 KB row (K = 1024) streams in ~150 cycles, and per-call overhead that
  // size stopped the int8 rows short of bf16's streaming rate
  const int64_t R = N % TR == 0 ? TR : 1;
  auto row = [&](int64_t n, int64_t m0, int nm, float* out, float*) {
    dispatch_rows(nm, [&]<int NM>() {
      for (int64_t r = 0; r < R; r++) row_int8<NM>(wp + (n + r) * K, K, xp + m0 * K, out + r * MT);
    });
  };
  if (scales.scalar_type() == at::kFloat) {
    const float* sp = scales.data_ptr<float>();
    return launch(x, N, bias, 0, row, [&](int64_t m, int64_t n, float d) { return d * sp[n] * step[m]; }, R);
  }
  const c10::BFloat16* sp = scales.data_ptr<c10::BFloat16>();
  return launch(x, N, bias, 0, row, [&](int64_t m, int64_t n, float d) { return d * to_f(sp[n]) * step[m]; }, R);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group_size,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "weight: expected uint8 [N, K / 2]");
  const int64_t N = w.size(0), K = w.size(1) * 2, G = group_size;
  TORCH_CHECK(G == 32 || G == 64 || G == 128, "group_size: 32, 64 or 128, got ", G);
  TORCH_CHECK(K % G == 0, "group_size ", G, " does not divide in_features ", K);
  check_common(x, w, K, bias);
  const int64_t ng = K / G, M = x.size(0);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == ng && scales.is_contiguous(),
              "scales: expected [N, K / group_size]");
  check_scales(scales);
  auto xb = bf16_activations(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  std::vector<float> off(M * ng);
  group_offsets(xp, M, K, G, off.data());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const bool f32_scales = scales.scalar_type() == at::kFloat;
  const void* sp = scales.data_ptr();
  auto row = [&](int64_t n, int64_t m0, int nm, float* out, float* buf) {
    const float* s = static_cast<const float*>(sp) + n * ng;
    if (!f32_scales) {  // bf16 scales as fp32, for the whole block of rows (consecutive in buf) at its start
      if (m0 == 0 && n % RB == 0) to_f32(static_cast<const uint16_t*>(sp) + n * ng, buf, std::min(RB, N - n) * ng);
      s = buf;
    }
    dispatch_rows(nm, [&]<int NM>() {
      const uint8_t* wr = wp + n * (K / 2);
      const uint16_t* xr = xp + m0 * K;
      const float* o = off.data() + m0 * ng;
      if (G == 32)
        row_int4<NM, 32>(wr, K, xr, o, s, out);
      else if (G == 64)
        row_int4<NM, 64>(wr, K, xr, o, s, out);
      else
        row_int4<NM, 128>(wr, K, xr, o, s, out);
    });
  };
  return launch(x, N, bias, f32_scales ? 0 : ng, row, [](int64_t, int64_t, float d) { return d; });
}

}  // namespace glmkit

TORCH_LIBRARY(glmkit_kernels, m) {
  m.def("supported() -> bool");
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scales, int group_size, Tensor? bias) -> Tensor");
  m.def(
      "decode_blocks(Tensor x, Tensor[] tensors, int[] linear_meta, Tensor(a!) k_cache, Tensor(b!) v_cache, int[] slots, "
      "int[] lengths, Tensor? rope, int n_head, float eps, str gelu) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.impl("supported", &cpu_supported);
}

TORCH_LIBRARY_IMPL(glmkit_kernels, CPU, m) {
  m.impl("linear_bf16", &glmkit::linear_bf16);
  m.impl("linear_f32", &glmkit::linear_f32);
  m.impl("linear_int8", &glmkit::linear_int8);
  m.impl("linear_int4", &glmkit::linear_int4);
  m.impl("decode_blocks", &glmkit::decode_blocks);
  m.impl("gelu_tanh", &glmkit::gelu_tanh_bf16);
}
