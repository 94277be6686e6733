// The int8 / int4 GEMV rows of quantized.cpp on AVX2 (no AVX-512): every weight format meets x held as int16 fixed
// point per row (x[m] ~ q[m] * step[m], finer than bf16) through vpmaddwd, which multiplies int16 pairs exactly and
// adds each pair into an int32 lane; the sums stay exact integers until a group's scale (int4) or the row's end
// (int8). int4 nibbles are widened to int16 (0..15) and the -8 offset is folded into each group's start value,
// -8 * sum(q[m] over the group). vpmaddubsw (u8 x s8) would take two weights per byte lane but needs x in int8: 256
// levels per row are far coarser than bf16.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gemv.h"
#include "simd.h"

namespace glmkit::gemv {

// rows of x [M, K] (fp32) as int16 fixed point: x[m] ~ q[m] * step[m], step = max|x[m]| / GLMKIT_FIXED16_MAX (reference.fixed16)
inline void to_i16_rows(const float* x, int64_t M, int64_t K, int16_t* q, float* step) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    __m256 vmax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xr + k), abs_mask));
    float amax = hmax(vmax);
    for (; k < K; k++) amax = std::max(amax, std::abs(xr[k]));
    step[m] = amax > 0.f ? amax / GLMKIT_FIXED16_MAX : 1.f;
    const float inv = 1.f / step[m];
    for (k = 0; k + 16 <= K; k += 16) {  // nearest even, saturated to int16
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), _mm256_set1_ps(inv)));
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), _mm256_set1_ps(inv)));
      _mm256_storeu_si256((__m256i*)(q + m * K + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    for (; k < K; k++)
      q[m * K + k] = static_cast<int16_t>(std::clamp(std::nearbyint(xr[k] * inv), -float(GLMKIT_FIXED16_MAX), float(GLMKIT_FIXED16_MAX)));
  }
}

// off[m * ng + g] = -8 * (sum of q[m] over group g): the nibbles' offset, exact in int32
inline void int4_offsets(const int16_t* q, int64_t M, int64_t K, int64_t G, int32_t* off) {
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < K / G; g++) {
      int32_t s = 0;
      for (int64_t k = g * G; k < (g + 1) * G; k++) s += q[m * K + k];
      off[m * (K / G) + g] = -8 * s;
    }
}

inline __m256i load16_i16(const int16_t* p, int64_t n) {
  if (n >= 16) return _mm256_loadu_si256((const __m256i*)p);
  alignas(32) int16_t t[16] = {};
  std::copy(p, p + n, t);
  return _mm256_load_si256((const __m256i*)t);
}

// out[m] = dot(w, q[m]) as an exact integer sum, in fp32 (the caller multiplies by the row's scale and step[m])
template <int NM>
void row_int8(const int8_t* w, int64_t K, const int16_t* x, float* out) {
  __m256 acc[NM][U];
  for (int m = 0; m < NM; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 4096) {  // 4096 inputs: at most 128 * 32767 * 512 per lane, inside int32
    const int64_t k1 = std::min<int64_t>(K, k0 + 4096);
    __m256i iacc[NM][U];
    for (int m = 0; m < NM; m++)
      for (int u = 0; u < U; u++) iacc[m][u] = _mm256_setzero_si256();
    int64_t k = k0;
    for (; k + 32 * U <= k1; k += 32 * U) {
      prefetch_ahead<U / 2, PREFETCH_AHEAD_INT>(w + k);
      __m256i wv[2 * U];
      for (int u = 0; u < 2 * U; u++) wv[u] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + k + 16 * u)));
      for (int m = 0; m < NM; m++)
        for (int u = 0; u < 2 * U; u++)
          iacc[m][u % U] = _mm256_add_epi32(
              iacc[m][u % U], _mm256_madd_epi16(wv[u], _mm256_loadu_si256((const __m256i*)(x + m * K + k + 16 * u))));
    }
    for (; k < k1; k += 16) {
      const int64_t n = std::min<int64_t>(16, k1 - k);
      alignas(16) int8_t t[16] = {};
      std::copy(w + k, w + k + n, t);
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i*)t));
      for (int m = 0; m < NM; m++)
        iacc[m][0] = _mm256_add_epi32(iacc[m][0], _mm256_madd_epi16(wv, load16_i16(x + m * K + k, n)));
    }
    for (int m = 0; m < NM; m++)
      for (int u = 0; u < U; u++) acc[m][u] = _mm256_add_ps(acc[m][u], _mm256_cvtepi32_ps(iacc[m][u]));
  }
  reduce_rows<NM>(acc, out);
}

// 16 packed bytes as int16 nibbles: lo = the low nibbles, hi = the high ones, in byte order
inline void nibbles16(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p));
  lo = _mm256_and_si256(b, _mm256_set1_epi16(0x000F));
  hi = _mm256_srli_epi16(b, 4);
}

inline __m256i madd(__m256i acc, __m256i w, const int16_t* x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i*)x)));
}

inline __m256i first_lane(int32_t v) { return _mm256_setr_epi32(v, 0, 0, 0, 0, 0, 0, 0); }

// out[m] = sum_g s[g] * dot(u - 8, q[m])_g for the int4 row w (layout: reference.py; chunks of 64 inputs, byte j =
// e[j] | e[j + 32] << 4, a final chunk of 32 packing byte j = e[j] | e[j + 16] << 4); off: int4_offsets
template <int NM, int G>
void row_int4(const uint8_t* w, int64_t K, const int16_t* x, const int32_t* off, const float* s, float* out) {
  const int64_t K64 = K / 64 * 64, ng = K / G;
  __m256 acc[NM];
  for (int m = 0; m < NM; m++) acc[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K64; k += 64) {
    prefetch_ahead<1, PREFETCH_AHEAD_INT>(w + k / 2);
    __m256i l0, h0, l1, h1;  // inputs k..k+15, k+32..k+47 and k+16..k+31, k+48..k+63
    nibbles16(w + k / 2, l0, h0);
    nibbles16(w + k / 2 + 16, l1, h1);
    const int64_t g = k / G;
    for (int m = 0; m < NM; m++) {
      const int16_t* xr = x + m * K + k;
      if constexpr (G == 32) {  // inputs k..k+31: group g, k+32..k+63: group g + 1
        const __m256i a = madd(madd(first_lane(off[m * ng + g]), l0, xr), l1, xr + 16);
        const __m256i b = madd(madd(first_lane(off[m * ng + g + 1]), h0, xr + 32), h1, xr + 48);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(s[g]), acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), _mm256_set1_ps(s[g + 1]), acc[m]);
      } else {  // the chunk lies in group g; its offset comes with the group's first chunk
        const __m256i init = k % G == 0 ? first_lane(off[m * ng + g]) : _mm256_setzero_si256();
        const __m256i a = madd(madd(madd(madd(init, l0, xr), l1, xr + 16), h0, xr + 32), h1, xr + 48);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(s[g]), acc[m]);
      }
    }
  }
  if (K64 < K) {  // a last chunk of 32 inputs (then G == 32)
    __m256i lo, hi;
    nibbles16(w + K64 / 2, lo, hi);
    const int64_t g = K64 / G;
    for (int m = 0; m < NM; m++) {
      const __m256i a = madd(madd(first_lane(off[m * ng + g]), lo, x + m * K + K64), hi, x + m * K + K64 + 16);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(s[g]), acc[m]);
    }
  }
  for (int m = 0; m < NM; m++) out[m] = hsum(acc[m]);
}

// ---- int4, 16 rows interleaved (reference.py): per 4 inputs k..k+3, 32 bytes, row i's bytes 2i = u[k] | u[k+2] << 4,
// 2i + 1 = u[k+1] | u[k+3] << 4. Widened to int16, the low nibbles of rows 0-7 are the pairs (u[k], u[k+1]) and the
// high ones (u[k+2], u[k+3]): one vpmaddwd against a broadcast pair of x gives 8 rows' sums. For up to 2 activation
// rows both halves of a block (rows 0-7, 8-15) go in one pass, sharing each broadcast of x and each loop step; for
// more, one half after the other, so that the accumulators of 4 activation rows fit in 16 registers.

inline __m256 load8_scales(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_scales(const uint16_t* p) { return load8(reinterpret_cast<const c10::BFloat16*>(p)); }

// tot[m] = the 8 rows of half `half` of the block w against q[m]: sum_g s[g][rows] * (dot_g + offset_g)
template <int NM, int G, typename ST>
void half_int4x16(const uint8_t* w, int64_t K, const int16_t* x, const int32_t* off, const ST* s, int half,
                  __m256 (&tot)[NM]) {
  const int64_t ng = K / G;
  for (int m = 0; m < NM; m++) tot[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    __m256i acc[NM];
    for (int m = 0; m < NM; m++) acc[m] = _mm256_set1_epi32(off[m * ng + g]);
    for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
      if (k % 8 == 0) prefetch_ahead<1, PREFETCH_AHEAD_INT>(w + k * 8);
      __m256i lo, hi;
      nibbles16(w + k * 8 + 16 * half, lo, hi);
#pragma GCC unroll 4
      for (int m = 0; m < NM; m++) {
        int32_t p0, p1;
        std::memcpy(&p0, x + m * K + k, 4);
        std::memcpy(&p1, x + m * K + k + 2, 4);
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(lo, _mm256_set1_epi32(p0)));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(hi, _mm256_set1_epi32(p1)));
      }
    }
    const __m256 sv = load8_scales(s + g * 16 + 8 * half);
    for (int m = 0; m < NM; m++) tot[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), sv, tot[m]);
  }
}

// tot[h][m] = half h of the block w against q[m], both halves in one pass (NM <= 2)
template <int NM, int G, typename ST>
void both_int4x16(const uint8_t* w, int64_t K, const int16_t* x, const int32_t* off, const ST* s,
                  __m256 (&tot)[2][NM]) {
  static_assert(NM <= 2, "2 x NM accumulators, 4 nibble vectors and 2 broadcasts must fit in 16 registers");
  const int64_t ng = K / G;
  for (int h = 0; h < 2; h++)
    for (int m = 0; m < NM; m++) tot[h][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    __m256i acc[2][NM];
    for (int m = 0; m < NM; m++) acc[0][m] = acc[1][m] = _mm256_set1_epi32(off[m * ng + g]);
    for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
      if (k % 8 == 0) prefetch_ahead<1, PREFETCH_AHEAD_INT>(w + k * 8);
      __m256i lo0, hi0, lo1, hi1;
      nibbles16(w + k * 8, lo0, hi0);
      nibbles16(w + k * 8 + 16, lo1, hi1);
#pragma GCC unroll 2
      for (int m = 0; m < NM; m++) {
        int32_t p0, p1;
        std::memcpy(&p0, x + m * K + k, 4);
        std::memcpy(&p1, x + m * K + k + 2, 4);
        const __m256i b0 = _mm256_set1_epi32(p0), b1 = _mm256_set1_epi32(p1);
        acc[0][m] = _mm256_add_epi32(acc[0][m], _mm256_add_epi32(_mm256_madd_epi16(lo0, b0), _mm256_madd_epi16(hi0, b1)));
        acc[1][m] = _mm256_add_epi32(acc[1][m], _mm256_add_epi32(_mm256_madd_epi16(lo1, b0), _mm256_madd_epi16(hi1, b1)));
      }
    }
    for (int h = 0; h < 2; h++) {
      const __m256 sv = load8_scales(s + g * 16 + 8 * h);
      for (int m = 0; m < NM; m++) tot[h][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][m]), sv, tot[h][m]);
    }
  }
}

}  // namespace glmkit::gemv
