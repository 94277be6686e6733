// Attention of one query over its keys and the rotary turn of one head, shared by the fused decode step
// (decode.cpp) and the prefill ops (prefill.cpp): fp32 math, keys and values fp32 or bf16; AVX-512 and AVX2 versions
// of the same computation (the AVX2 one 8 keys and 8 values per register).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "simd.h"

namespace glmkit::attend {

constexpr int64_t MAX_HEAD_SIZE = GLMKIT_MAX_HEAD_SIZE;  // attend_head holds a head's query in registers

#if defined(GLMKIT_ISA_AVX512)

// 16 cached values as fp32: the cache is fp32 or bf16
inline __m512 load_cached(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_cached(const c10::BFloat16* p, __mmask16 m) { return load_bf16(p, m); }

// y = softmax(q . K[t] * scale over t < T with vis[t]) @ V for one head of ND * 16 values (the last 16 masked by
// dm); vis: T bools, or null for every key; s: T floats of scratch. Scores go 16 keys at a time, their dot products
// reduced together (sum16); the weighted sum of V runs over t with the ND output vectors held in registers. A query
// that sees no key gets zeros.
template <int ND, typename CT, bool PREFETCH>
inline void attend_head(const float* q, const CT* K, const CT* V, const bool* vis, int64_t T, int64_t D,
                               __mmask16 dm, float scale, float* s, float* y) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  auto dmask = [dm](int d) { return d == ND - 1 ? dm : __mmask16(0xFFFF); };
  __m512 qv[ND];
#pragma GCC unroll 8
  for (int d = 0; d < ND; d++) qv[d] = _mm512_maskz_loadu_ps(dmask(d), q + 16 * d);
  __m512 mx = neg_inf;
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) {
      const CT* k = K + std::min<int64_t>(t0 + j, T - 1) * D;  // past T: a repeat, masked out below
      // each (row, head) streams only its own T keys and values: too short a stream for the hardware prefetcher
      // to get ahead of, so fetch the keys 16 ahead and this block's values (read in the second pass) by hand
      // (a prefill's keys were just written: they are in cache)
      if constexpr (PREFETCH) {
        const char* pk = reinterpret_cast<const char*>(K + std::min<int64_t>(t0 + 16 + j, T - 1) * D);
        const char* pv = reinterpret_cast<const char*>(V + std::min<int64_t>(t0 + j, T - 1) * D);
        for (int64_t o = 0; o < D * int64_t(sizeof(CT)); o += 64) {
          _mm_prefetch(pk + o, _MM_HINT_T0);
          _mm_prefetch(pv + o, _MM_HINT_T0);
        }
      }
      __m512 a = _mm512_mul_ps(qv[0], load_cached(k, dmask(0)));
#pragma GCC unroll 8
      for (int d = 1; d < ND; d++) a = _mm512_fmadd_ps(qv[d], load_cached(k + 16 * d, dmask(d)), a);
      acc[j] = a;
    }
    const __mmask16 m = tail(T, t0);
    __mmask16 seen = m;
    if (vis) {
      const __m128i v = _mm_maskz_loadu_epi8(m, vis + t0);
      seen = _mm_mask_test_epi8_mask(m, v, v);
    }
    const __m512 sc = _mm512_mask_blend_ps(seen, neg_inf, _mm512_mul_ps(glmkit::sum16(acc), _mm512_set1_ps(scale)));
    _mm512_mask_storeu_ps(s + t0, m, sc);
    mx = _mm512_mask_max_ps(mx, seen, mx, sc);
  }
  const float top = _mm512_reduce_max_ps(mx);
  if (top == -std::numeric_limits<float>::infinity()) {
    for (int d = 0; d < ND; d++) _mm512_mask_storeu_ps(y + 16 * d, dmask(d), _mm512_setzero_ps());
    return;
  }
  const __m512 mxv = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 m = tail(T, t);
    const __m512 sv = _mm512_maskz_loadu_ps(m, s + t);
    // exp_nonpositive clamps at e^-87: unseen keys get an exact 0
    const __mmask16 seen = _mm512_mask_cmp_ps_mask(m, sv, neg_inf, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(seen, exp_nonpositive(_mm512_sub_ps(sv, mxv)));
    _mm512_mask_storeu_ps(s + t, m, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  __m512 out[ND];
#pragma GCC unroll 8
  for (int d = 0; d < ND; d++) out[d] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; t++) {
    const __m512 p = _mm512_set1_ps(s[t]);
#pragma GCC unroll 8
    for (int d = 0; d < ND; d++) out[d] = _mm512_fmadd_ps(p, load_cached(V + t * D + 16 * d, dmask(d)), out[d]);
  }
#pragma GCC unroll 8
  for (int d = 0; d < ND; d++) _mm512_mask_storeu_ps(y + 16 * d, dmask(d), _mm512_mul_ps(out[d], inv));
}

template <typename CT, bool PREFETCH>
inline void attend_head_any(const float* q, const CT* K, const CT* V, const bool* vis, int64_t T, int64_t D,
                            float scale, float* s, float* y) {
  const __mmask16 dm = tail(D, (D - 1) / 16 * 16);
  switch ((D + 15) / 16) {
    case 1: return attend_head<1, CT, PREFETCH>(q, K, V, vis, T, D, dm, scale, s, y);
    case 2: return attend_head<2, CT, PREFETCH>(q, K, V, vis, T, D, dm, scale, s, y);
    case 3: return attend_head<3, CT, PREFETCH>(q, K, V, vis, T, D, dm, scale, s, y);
    case 4: return attend_head<4, CT, PREFETCH>(q, K, V, vis, T, D, dm, scale, s, y);
    case 5: return attend_head<5, CT, PREFETCH>(q, K, V, vis, T, D, dm, scale, s, y);
    case 6: return attend_head<6, CT, PREFETCH>(q, K, V, vis, T, D, dm, scale, s, y);
    case 7: return attend_head<7, CT, PREFETCH>(q, K, V, vis, T, D, dm, scale, s, y);
    default: return attend_head<8, CT, PREFETCH>(q, K, V, vis, T, D, dm, scale, s, y);
  }
}

// out[2i], out[2i + 1] = (x[2i], x[2i + 1]) turned by the angle of cos c[i], sin s[i] for i < D / 2, 16 pairs per
// vector; rounded as the Python path's apply_rotary rounds (each product, then the sum: no fused multiply-add).
// out may be x.
__attribute__((optimize("fp-contract=off"))) inline void rotate(const float* x, const float* c,
                                                                    const float* s, int64_t D, float* out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  const int64_t half = D / 2;
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const __m512 u = _mm512_loadu_ps(x + 2 * i), w = _mm512_loadu_ps(x + 2 * i + 16);
    const __m512 a = _mm512_permutex2var_ps(u, even, w), b = _mm512_permutex2var_ps(u, odd, w);
    const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
    const __m512 r0 = _mm512_sub_ps(_mm512_mul_ps(a, cv), _mm512_mul_ps(b, sv));
    const __m512 r1 = _mm512_add_ps(_mm512_mul_ps(a, sv), _mm512_mul_ps(b, cv));
    _mm512_storeu_ps(out + 2 * i, _mm512_permutex2var_ps(r0, lo, r1));
    _mm512_storeu_ps(out + 2 * i + 16, _mm512_permutex2var_ps(r0, hi, r1));
  }
  for (; i < half; i++) {
    const float a = x[2 * i], b = x[2 * i + 1];
    out[2 * i] = a * c[i] - b * s[i];
    out[2 * i + 1] = a * s[i] + b * c[i];
  }
}

#else  // AVX2

// y = softmax(q . K[t] * scale over t < T with vis[t]) @ V for one head of D <= 8 * ND values, as the AVX-512
// attend_head: scores 8 keys at a time (their dot products reduced together by sum8), then the weighted sum of V with
// the output in registers. A query that sees no key gets zeros.
template <int ND, typename CT, bool PREFETCH>
inline void attend_head(const float* q, const CT* K, const CT* V, const bool* vis, int64_t T, int64_t D, float scale,
                        float* s, float* y) {
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  __m256 qv[ND];
#pragma GCC unroll 16
  for (int d = 0; d < ND; d++) qv[d] = load8(q + 8 * d, D - 8 * d);
  float top = NEG_INF;
  for (int64_t t0 = 0; t0 < T; t0 += 8) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
      const CT* k = K + std::min<int64_t>(t0 + j, T - 1) * D;  // past T: a repeat, not stored below
      if constexpr (PREFETCH) {  // see the AVX-512 version
        const char* pk = reinterpret_cast<const char*>(K + std::min<int64_t>(t0 + 8 + j, T - 1) * D);
        const char* pv = reinterpret_cast<const char*>(V + std::min<int64_t>(t0 + j, T - 1) * D);
        for (int64_t o = 0; o < D * int64_t(sizeof(CT)); o += 64) {
          _mm_prefetch(pk + o, _MM_HINT_T0);
          _mm_prefetch(pv + o, _MM_HINT_T0);
        }
      }
      __m256 a = _mm256_mul_ps(qv[0], load8(k, D));
#pragma GCC unroll 16
      for (int d = 1; d < ND; d++) a = _mm256_fmadd_ps(qv[d], load8(k + 8 * d, D - 8 * d), a);
      acc[j] = a;
    }
    alignas(32) float sc[8];
    _mm256_store_ps(sc, _mm256_mul_ps(sum8(acc), _mm256_set1_ps(scale)));
    for (int64_t j = 0; j < 8 && t0 + j < T; j++) {
      const float v = vis && !vis[t0 + j] ? NEG_INF : sc[j];
      s[t0 + j] = v;
      top = std::max(top, v);
    }
  }
  if (top == NEG_INF) {
    for (int64_t d = 0; d < D; d++) y[d] = 0.f;
    return;
  }
  const __m256 mxv = _mm256_set1_ps(top), neg_inf = _mm256_set1_ps(NEG_INF);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; t += 8) {
    const __m256 sv = load8(s + t, T - t);
    // unseen keys (and lanes past T) get an exact 0: exp_nonpositive clamps at e^-87
    const __m256 seen = _mm256_and_ps(_mm256_cmp_ps(sv, neg_inf, _CMP_NEQ_OQ), _mm256_castsi256_ps(tail8(T - t)));
    const __m256 e = _mm256_and_ps(seen, exp_nonpositive(_mm256_sub_ps(sv, mxv)));
    store8(s + t, e, T - t);
    sum = _mm256_add_ps(sum, e);
  }
  const __m256 inv = _mm256_set1_ps(1.f / hsum(sum));
  __m256 out[ND];
#pragma GCC unroll 16
  for (int d = 0; d < ND; d++) out[d] = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; t++) {
    const __m256 p = _mm256_set1_ps(s[t]);
#pragma GCC unroll 16
    for (int d = 0; d < ND; d++) out[d] = _mm256_fmadd_ps(p, load8(V + t * D + 8 * d, D - 8 * d), out[d]);
  }
#pragma GCC unroll 16
  for (int d = 0; d < ND; d++) store8(y + 8 * d, _mm256_mul_ps(out[d], inv), D - 8 * d);
}

template <typename CT, bool PREFETCH>
inline void attend_head_any(const float* q, const CT* K, const CT* V, const bool* vis, int64_t T, int64_t D,
                            float scale, float* s, float* y) {
  switch ((D + 7) / 8) {
    case 1: return attend_head<1, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 2: return attend_head<2, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 3: return attend_head<3, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 4: return attend_head<4, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 5: return attend_head<5, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 6: return attend_head<6, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 7: return attend_head<7, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 8: return attend_head<8, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 9: return attend_head<9, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 10: return attend_head<10, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 11: return attend_head<11, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 12: return attend_head<12, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 13: return attend_head<13, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 14: return attend_head<14, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    case 15: return attend_head<15, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
    default: return attend_head<16, CT, PREFETCH>(q, K, V, vis, T, D, scale, s, y);
  }
}

// out = x turned pair by pair, as the AVX-512 rotate (the same rounding: no fused multiply-add); out may be x
__attribute__((optimize("fp-contract=off"))) inline void rotate(const float* x, const float* c, const float* s,
                                                                int64_t D, float* out) {
  const int64_t half = D / 2;
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 u = _mm256_loadu_ps(x + 2 * i), w = _mm256_loadu_ps(x + 2 * i + 8);
    const __m256 a = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(u, w, 0x88)), 0xD8));
    const __m256 b = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(u, w, 0xDD)), 0xD8));
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    const __m256 r0 = _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv));
    const __m256 r1 = _mm256_add_ps(_mm256_mul_ps(a, sv), _mm256_mul_ps(b, cv));
    const __m256 lo = _mm256_unpacklo_ps(r0, r1), hi = _mm256_unpackhi_ps(r0, r1);
    _mm256_storeu_ps(out + 2 * i, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out + 2 * i + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  for (; i < half; i++) {
    const float a = x[2 * i], b = x[2 * i + 1];
    out[2 * i] = a * c[i] - b * s[i];
    out[2 * i + 1] = a * s[i] + b * c[i];
  }
}

#endif

}  // namespace glmkit::attend
