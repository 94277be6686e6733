// Weight-only int8 / int4 GEMV for decoding (glmkit.kernels); the driver and conventions are linear.cpp's (gemv.h).
//   int8: sign-extend to int16 and vpdpwssd against x held as int16 fixed point per row (finer than bf16):
//         exact integer products, summed in int32 over blocks of 4096 inputs, then in fp32; one scale per row.
//   int4: nibbles become bf16 (128 + u) by OR-ing an exponent in, then vdpbf16ps against bf16 x; each group's
//         accumulator starts at -136/16 of the group's activation sum, so the 128 + 8 offset costs nothing in the
//         loop: y = sum_g s_g * (dot(128 + u, x)_g - 136 * sum(x)_g) = sum_g s_g * dot(u - 8, x)_g.
// int4 layout (glmkit/kernels/reference.py): per row, chunks of 64 inputs, byte j = e[j] | e[j + 32] << 4; a final
// chunk of 32 inputs (K % 64 == 32) packs byte j = e[j] | e[j + 16] << 4. Stored nibble u = q + 8.
// These are the AVX-512 BF16 / VNNI kernels; AVX2 builds take quantized_avx2.h's (int4 against int16 x there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gemv.h"
#include "linear.h"
#include "simd.h"
#if defined(GLMKIT_ISA_AVX2)
#include "quantized_avx2.h"
#endif

namespace {

using namespace glmkit::gemv;

#if defined(GLMKIT_ISA_AVX512)

// rows of x [M, K] (fp32) as int16 fixed point: x[m] ~ q[m] * step[m], step = max|x[m]| / GLMKIT_FIXED16_MAX (reference.fixed16)
void to_i16_rows(const float* x, int64_t M, int64_t K, int16_t* q, float* step) {
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    __m512 vmax = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
    float amax = _mm512_reduce_max_ps(vmax);
    for (; k < K; k++) amax = std::max(amax, std::abs(xr[k]));
    step[m] = amax > 0.f ? amax / GLMKIT_FIXED16_MAX : 1.f;
    const float inv = 1.f / step[m];
    for (k = 0; k + 16 <= K; k += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), _mm512_set1_ps(inv)));  // nearest even
      _mm256_storeu_si256((__m256i*)(q + m * K + k), _mm512_cvtsepi32_epi16(v));
    }
    for (; k < K; k++) q[m * K + k] = static_cast<int16_t>(std::clamp(std::nearbyint(xr[k] * inv), -float(GLMKIT_FIXED16_MAX), float(GLMKIT_FIXED16_MAX)));
  }
}

// off[m * ng + g] = -136 / 16 * (sum of the bf16 activations x[m] over group g)
void group_offsets(const uint16_t* x, int64_t M, int64_t K, int64_t G, float* off) {
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);  // bf16 1.0
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < K / G; g++) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(x + m * K + k), ones);
      off[m * (K / G) + g] = -136.f / 16.f * _mm512_reduce_add_ps(a);
    }
}


template <int NM>
void row_int8(const int8_t* w, int64_t K, const int16_t* x, float* out) {
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
      prefetch_ahead<U / 2, PREFETCH_AHEAD_INT>(w + k);
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
inline void unpack64(const uint8_t* p, __m512bh& lo, __m512bh& hi) {
  const __m512i low = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);  // bf16 0x4300 | u = 128 + u
  __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
  lo = (__m512bh)_mm512_ternarylogic_epi32(b, low, magic, 0xEA);  // (b & 0xF) | magic
  hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(b, 4), magic);
}

// 32 inputs from k (one half-chunk, in group g) into accumulator slot J: part = init + dot(128 + u, x), where init is
// the group's offset on its first half-chunk and 0 otherwise; acc += part * s[g]. The callers hand slot J the inputs
// 32 * J modulo 128 of a 128-aligned block, so "first half-chunk of its group" is known at compile time.
template <int NM, int J, int G>
inline void int4_half(__m512 (&acc)[NM][U], __m512bh w, const uint16_t* x, int64_t K, int64_t k,
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
void row_int4(const uint8_t* w, int64_t K, const uint16_t* x, const float* off, const float* s, float* out) {
  const int64_t K64 = K / 64 * 64;
  __m512 acc[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 128 <= K64; k += 128) {  // two chunks, four half-chunks, four accumulators
    prefetch_ahead<1, PREFETCH_AHEAD_INT>(w + k / 2);
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

#endif

// x as the int4 kernels take it, per activation row: AVX-512 rounds it to bf16 (vdpbf16ps), with each group's
// offset as fp32; AVX2 holds it as int16 fixed point, x[m] ~ q[m] * step[m] (vpmaddwd), with exact int32 offsets
struct Int4Acts {
#if defined(GLMKIT_ISA_AVX512)
  at::Tensor xb;
  const uint16_t* x;
  std::vector<float> off;
  float step(int64_t) const { return 1.f; }
#else
  std::vector<int16_t> q;
  std::vector<float> steps;
  const int16_t* x;
  std::vector<int32_t> off;
  float step(int64_t m) const { return steps[m]; }
#endif
};

Int4Acts int4_activations(const at::Tensor& x, int64_t G) {
  const int64_t M = x.size(0), K = x.size(1);
  Int4Acts a;
  a.off.resize(M * (K / G));
#if defined(GLMKIT_ISA_AVX512)
  a.xb = bf16_activations(x);
  a.x = reinterpret_cast<const uint16_t*>(a.xb.data_ptr());
  group_offsets(a.x, M, K, G, a.off.data());
#else
  const at::Tensor xf = f32_activations(x);
  a.q.resize(M * K);
  a.steps.resize(M);
  to_i16_rows(xf.data_ptr<float>(), M, K, a.q.data(), a.steps.data());
  a.x = a.q.data();
  int4_offsets(a.x, M, K, G, a.off.data());
#endif
  return a;
}

}  // namespace

namespace glmkit {

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
  TORCH_CHECK(int4_group_supported(G), "group_size: one of ", INT4_GROUPS_TEXT, ", got ", G);
  TORCH_CHECK(K % G == 0, "group_size ", G, " does not divide in_features ", K);
  check_common(x, w, K, bias);
  const int64_t ng = K / G, M = x.size(0);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == ng && scales.is_contiguous(),
              "scales: expected [N, K / group_size]");
  check_scales(scales);
  const Int4Acts a = int4_activations(x, G);
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
      const auto* xr = a.x + m0 * K;
      const auto* o = a.off.data() + m0 * ng;
      dispatch_group(G, [&]<int GS>() { row_int4<NM, GS>(wr, K, xr, o, s, out); });
    });
  };
  return launch(x, N, bias, f32_scales ? 0 : ng, row, [&](int64_t m, int64_t, float d) { return d * a.step(m); });
}

}  // namespace glmkit

namespace {

constexpr int64_t BLOCK_ROWS = GLMKIT_INT4_BLOCK_ROWS;
static_assert(BLOCK_ROWS == 16, "an interleaved int4 block is one AVX-512 vector of fp32 sums (two AVX2 halves)");


// an fp32 or bf16 bias read where it lies (no per-call conversion), or none
struct Bias {
  const void* p = nullptr;
  bool bf16 = false;
};

#if defined(GLMKIT_ISA_AVX512)

// ---- int4, 16 rows interleaved (QuantizedLinear's in-memory layout, glmkit/kernels/reference.py) ------------------
// w16 [N / 16, 8K]: per block of 16 weight rows, per 4 inputs k..k+3, 32 bytes: row i's bytes 2i = u[k] | u[k + 2] << 4
// and 2i + 1 = u[k + 1] | u[k + 3] << 4; scales [N / 16, K / G, 16]. One vdpbf16ps multiplies 16 rows' pairs by one
// broadcast pair of x, each lane summing its own row, so a group's scale is one FMA per 16 rows rather than one per
// row and per 32 inputs: 1.7x the row-major kernel's arithmetic rate (benchmarks/RESULTS.md).

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 bf16 as fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline __m512 load_bias(const Bias& b, int64_t n) {
  return b.bf16 ? load16(static_cast<const uint16_t*>(b.p) + n) : load16(static_cast<const float*>(b.p) + n);
}

// y[m][0..16) = the 16 rows of block w against x[m] (+ bias[n0..n0 + 16)), for NM activation rows (stride K;
// y: stride N)
template <int NM, int G, typename ST, typename Out>
void block_int4x16(const uint8_t* w, int64_t K, const Int4Acts& a, int64_t m0, const ST* s, const Bias& bias,
                   int64_t n0, Out* y, int64_t N) {
  const __m512i low = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);  // bf16 0x4300 | u = 128 + u
  const int64_t ng = K / G;
  const uint16_t* x = a.x + m0 * K;
  const float* off = a.off.data() + m0 * ng;
  __m512 tot[NM];
  for (int m = 0; m < NM; m++) tot[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    // four accumulators per activation row hide vdpbf16ps' latency; the first starts at the 128 + 8 offset's
    // correction (see int4_half)
    __m512 acc[NM][4];
    for (int m = 0; m < NM; m++) {
      acc[m][0] = _mm512_set1_ps(16.f * off[m * ng + g]);
      acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
    }
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; j++) {
        const int64_t kk = k + 4 * j;
        if (j % 2 == 0) prefetch_ahead<1, PREFETCH_AHEAD_INT>(w + kk * 8);
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + kk * 8)));
        const __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(b, low, magic, 0xEA);  // (b & 0xF) | magic
        const __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(b, 4), magic);
#pragma GCC unroll 4
        for (int m = 0; m < NM; m++) {
          const __m512bh x0 = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + m * K + kk));
          const __m512bh x1 = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + m * K + kk + 2));
          acc[m][j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[m][j], lo, x0), hi, x1);
        }
      }
    }
    const __m512 sv = load16(s + g * 16);
    for (int m = 0; m < NM; m++) {
      const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
      tot[m] = _mm512_fmadd_ps(a, sv, tot[m]);
    }
  }
  for (int m = 0; m < NM; m++) {
    const __m512 v = bias.p ? _mm512_add_ps(tot[m], load_bias(bias, n0)) : tot[m];
    if constexpr (sizeof(Out) == 4)
      _mm512_storeu_ps(reinterpret_cast<float*>(y + m * N), v);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

#else

inline __m256 load_bias8(const Bias& b, int64_t n) {
  return b.bf16 ? glmkit::load8(static_cast<const c10::BFloat16*>(b.p) + n) : glmkit::load8(static_cast<const float*>(b.p) + n);
}

// y[m][0..16) = the 16 rows of block w against x[m] (+ bias[n0..n0 + 16)), as the AVX-512 block_int4x16
template <int NM, int G, typename ST, typename Out>
void block_int4x16(const uint8_t* w, int64_t K, const Int4Acts& a, int64_t m0, const ST* s, const Bias& bias,
                   int64_t n0, Out* y, int64_t N) {
  __m256 tot[2][NM];
  if constexpr (NM <= 2) {
    both_int4x16<NM, G>(w, K, a.x + m0 * K, a.off.data() + m0 * (K / G), s, tot);
  } else {
    half_int4x16<NM, G>(w, K, a.x + m0 * K, a.off.data() + m0 * (K / G), s, 0, tot[0]);
    half_int4x16<NM, G>(w, K, a.x + m0 * K, a.off.data() + m0 * (K / G), s, 1, tot[1]);
  }
  for (int half = 0; half < 2; half++) {
    for (int m = 0; m < NM; m++) {
      __m256 v = _mm256_mul_ps(tot[half][m], _mm256_set1_ps(a.step(m0 + m)));
      if (bias.p) v = _mm256_add_ps(v, load_bias8(bias, n0 + 8 * half));
      if constexpr (sizeof(Out) == 4)
        glmkit::store8(reinterpret_cast<float*>(y + m * N + 8 * half), v);
      else
        glmkit::store8(reinterpret_cast<c10::BFloat16*>(y + m * N + 8 * half), v);
    }
  }
}

#endif

template <typename ST, typename Out>
void run_int4x16(const uint8_t* w, const Int4Acts& a, const ST* s, const Bias& bias, int64_t M, int64_t N, int64_t K,
                 int64_t G, Out* y) {
  const int64_t ng = K / G;
  at::parallel_for(0, N / BLOCK_ROWS, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++)
      for (int64_t m0 = 0; m0 < M; m0 += MT)
        dispatch_rows(static_cast<int>(std::min<int64_t>(MT, M - m0)), [&]<int NM>() {
          dispatch_group(G, [&]<int GS>() {
            block_int4x16<NM, GS>(w + b * K * 8, K, a, m0, s + b * ng * BLOCK_ROWS, bias, b * BLOCK_ROWS,
                                  y + m0 * N + b * BLOCK_ROWS, N);
          });
        });
  });
}

}  // namespace

namespace glmkit {

at::Tensor linear_int4x16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group_size,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.size(1) % 8 == 0,
              "weight: expected uint8 [N / 16, 8 K] (16 rows interleaved)");
  const int64_t N = w.size(0) * BLOCK_ROWS, K = w.size(1) / 8, G = group_size;
  TORCH_CHECK(int4_group_supported(G), "group_size: one of ", INT4_GROUPS_TEXT, ", got ", G);
  TORCH_CHECK(K % G == 0, "group_size ", G, " does not divide in_features ", K);
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && w.is_contiguous(), "CPU tensors, contiguous weight");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x: expected [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == N / BLOCK_ROWS && scales.size(1) == K / G &&
                  scales.size(2) == BLOCK_ROWS &&
                  scales.is_contiguous(),
              "scales: expected [N / 16, K / group_size, 16]");
  check_scales(scales);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                        (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16)),
              "bias: expected float32 or bfloat16 [N]");
  const int64_t M = x.size(0);
  const Int4Acts a = int4_activations(x, G);
  const Bias bp = bias ? Bias{bias->data_ptr(), bias->scalar_type() == at::kBFloat16} : Bias{};
  auto y = at::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  auto with_scales = [&](auto* yp) {
    if (scales.scalar_type() == at::kFloat)
      run_int4x16(wp, a, scales.data_ptr<float>(), bp, M, N, K, G, yp);
    else
      run_int4x16(wp, a, reinterpret_cast<const uint16_t*>(scales.data_ptr()), bp, M, N, K, G, yp);
  };
  if (x.scalar_type() == at::kFloat)
    with_scales(y.data_ptr<float>());
  else
    with_scales(reinterpret_cast<uint16_t*>(y.data_ptr()));
  return y;
}

}  // namespace glmkit
