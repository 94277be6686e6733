// Dropout for CPU training without stored masks or a sequential generator (glmkit.kernels.training).
//
// At the paper's dropout 0.1 a GLM-Large training step on this CPU spent ~15 % in aten::bernoulli_ (~4.4 ns per
// value from one sequential generator) and ~25 % in SDPA's math path, the only CPU attention with dropout: a chain of
// ATen passes over [batch, heads, S, S] tensors (benchmarks/RESULTS.md). Here the keep decision of every value is a
// hash of (seed, row, column): 16 decisions per few vector instructions, and the backward pass regenerates the mask
// from the seed instead of storing it. Attention keeps its two matmuls in oneDNN (torch.bmm on bf16, as autocast
// runs them) and does everything between them in one pass per direction: scale, mask, softmax, dropout forward;
// softmax and dropout gradients backward, with the probabilities recomputed from the saved log-sum-exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using glmkit::exp_nonpositive;
#if defined(GLMKIT_ISA_AVX512)
using glmkit::load_bf16;
using glmkit::store_bf16;
using glmkit::tail;
#else
using glmkit::load8;
using glmkit::store8;
#endif

constexpr int64_t DROPOUT_ROW = 4096;  // a flat tensor's values are hashed as rows of this many columns

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t row_key(int64_t seed, int64_t row) {
  return splitmix64(static_cast<uint64_t>(seed) ^ splitmix64(static_cast<uint64_t>(row)));
}

uint32_t drop_threshold(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  return static_cast<uint32_t>(std::min(std::llround(p * 4294967296.0), 4294967295ll));
}

#if defined(GLMKIT_ISA_AVX512)

// a bijective 32-bit mixer (Wellons' lowbias32), on 16 lanes
inline __m512i mix32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// keep bits of columns j .. j + 15 of the row whose key is `key`: uniform 32-bit values compared with p * 2^32
inline __mmask16 keep16(uint64_t key, int64_t j, uint32_t threshold) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j)), iota);
  __m512i x = mix32(_mm512_xor_si512(col, _mm512_set1_epi32(static_cast<int>(key))));
  x = mix32(_mm512_add_epi32(x, _mm512_set1_epi32(static_cast<int>(key >> 32))));
  return _mm512_cmpge_epu32_mask(x, _mm512_set1_epi32(static_cast<int>(threshold)));
}

inline __mmask16 visible16(const bool* m, int64_t j, __mmask16 t) {
  return _mm_mask_cmpneq_epi8_mask(t, _mm_maskz_loadu_epi8(t, m + j), _mm_setzero_si128());
}

// one query row: scores s (bf16, T) -> dropped-out probabilities in place; returns the log-sum-exp (+inf: no key)
float probs_row(c10::BFloat16* s, const bool* m, int64_t T, float scale, uint64_t key, uint32_t thr,
                       float keep_scale, float* buf) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < T; j += 16) {
    const __mmask16 vis = visible16(m, j, tail(T, j));
    const __m512 v = _mm512_mul_ps(load_bf16(s + j, vis), _mm512_set1_ps(scale));
    _mm512_storeu_ps(buf + j, v);
    mx = _mm512_mask_max_ps(mx, vis, mx, v);
  }
  const float row_max = _mm512_reduce_max_ps(mx);
  if (row_max == -std::numeric_limits<float>::infinity()) {
    for (int64_t j = 0; j < T; j += 16) store_bf16(s + j, _mm512_setzero_ps(), tail(T, j));
    return std::numeric_limits<float>::infinity();
  }
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < T; j += 16) {
    const __mmask16 vis = visible16(m, j, tail(T, j));
    const __m512 e = _mm512_maskz_mov_ps(vis, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(buf + j),
                                                                           _mm512_set1_ps(row_max))));
    _mm512_storeu_ps(buf + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float total = _mm512_reduce_add_ps(sum);
  const __m512 f = _mm512_set1_ps(keep_scale / total);
  for (int64_t j = 0; j < T; j += 16) {
    const __mmask16 t = tail(T, j);
    store_bf16(s + j, _mm512_maskz_mul_ps(keep16(key, j, thr), _mm512_loadu_ps(buf + j), f), t);
  }
  return row_max + std::log(total);
}

// one query row backward: s (scores) -> dropped-out probabilities, g (dL/d dropped-out probabilities) -> dL/d
// (q . k), both in place; delta = sum_j P_ij dL/dP_ij = dO_i . O_i
void probs_row_backward(c10::BFloat16* s, c10::BFloat16* g, const bool* m, int64_t T, float scale, float lse,
                               float delta, uint64_t key, uint32_t thr, float keep_scale) {
  for (int64_t j = 0; j < T; j += 16) {
    const __mmask16 t = tail(T, j), vis = visible16(m, j, t), keep = keep16(key, j, thr);
    const __m512 x = _mm512_fmsub_ps(load_bf16(s + j, vis), _mm512_set1_ps(scale), _mm512_set1_ps(lse));
    const __m512 p = _mm512_maskz_mov_ps(vis, exp_nonpositive(x));
    store_bf16(s + j, _mm512_maskz_mul_ps(keep, p, _mm512_set1_ps(keep_scale)), t);
    const __m512 dp = _mm512_maskz_mul_ps(keep, load_bf16(g + j, t), _mm512_set1_ps(keep_scale));
    const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(dp, _mm512_set1_ps(delta))), _mm512_set1_ps(scale));
    store_bf16(g + j, ds, t);
  }
}

template <typename T>
void dropout_rows(const T* x, T* y, int64_t n, int64_t c0, int64_t c1, int64_t seed, uint32_t thr, float f) {
  for (int64_t c = c0; c < c1; c++) {
    const uint64_t key = row_key(seed, c);
    const int64_t end = std::min(n, (c + 1) * DROPOUT_ROW);
    for (int64_t i = c * DROPOUT_ROW; i < end; i += 16) {
      const __mmask16 t = tail(end, i), keep = keep16(key, i - c * DROPOUT_ROW, thr);
      if constexpr (std::is_same_v<T, float>) {
        _mm512_mask_storeu_ps(y + i, t, _mm512_maskz_mul_ps(keep, _mm512_maskz_loadu_ps(t, x + i), _mm512_set1_ps(f)));
      } else {
        store_bf16(y + i, _mm512_maskz_mul_ps(keep, load_bf16(x + i, t), _mm512_set1_ps(f)), t);
      }
    }
  }
}

#else  // AVX2: the same hash and math, 8 lanes at a time (the keep bits of a column do not depend on the width)

inline __m256i mix32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// all-ones lanes for the kept columns j .. j + 7 (x >= threshold, unsigned: compared with the sign bit flipped)
inline __m256 keep8(uint64_t key, int64_t j, uint32_t threshold) {
  const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i x = mix32(_mm256_xor_si256(col, _mm256_set1_epi32(static_cast<int>(key))));
  x = mix32(_mm256_add_epi32(x, _mm256_set1_epi32(static_cast<int>(key >> 32))));
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);
  const __m256i drop = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(threshold ^ 0x80000000u)),
                                          _mm256_xor_si256(x, flip));
  return _mm256_castsi256_ps(_mm256_xor_si256(drop, _mm256_set1_epi32(-1)));
}

// all-ones lanes for the visible columns among j .. j + 7 below n
inline __m256 visible8(const bool* m, int64_t j, int64_t n) {
  long long b = 0;  // bytes past n stay 0: not visible
  std::memcpy(&b, m + j, std::min<int64_t>(8, n - j));
  const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(b));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(v, _mm256_setzero_si256()));
}

float probs_row(c10::BFloat16* s, const bool* m, int64_t T, float scale, uint64_t key, uint32_t thr,
                float keep_scale, float* buf) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 mx = neg_inf;
  for (int64_t j = 0; j < T; j += 8) {
    const __m256 vis = visible8(m, j, T);
    const __m256 v = _mm256_blendv_ps(neg_inf, _mm256_mul_ps(load8(s + j, T - j), _mm256_set1_ps(scale)), vis);
    _mm256_storeu_ps(buf + j, v);
    mx = _mm256_max_ps(mx, v);
  }
  const float row_max = glmkit::hmax(mx);
  if (row_max == -std::numeric_limits<float>::infinity()) {
    for (int64_t j = 0; j < T; j += 8) store8(s + j, _mm256_setzero_ps(), T - j);
    return std::numeric_limits<float>::infinity();
  }
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < T; j += 8) {
    const __m256 vis = visible8(m, j, T);
    const __m256 e = _mm256_and_ps(vis, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(buf + j),
                                                                      _mm256_set1_ps(row_max))));
    _mm256_storeu_ps(buf + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  const float total = glmkit::hsum(sum);
  const __m256 f = _mm256_set1_ps(keep_scale / total);
  for (int64_t j = 0; j < T; j += 8)
    store8(s + j, _mm256_and_ps(keep8(key, j, thr), _mm256_mul_ps(_mm256_loadu_ps(buf + j), f)), T - j);
  return row_max + std::log(total);
}

void probs_row_backward(c10::BFloat16* s, c10::BFloat16* g, const bool* m, int64_t T, float scale, float lse,
                        float delta, uint64_t key, uint32_t thr, float keep_scale) {
  for (int64_t j = 0; j < T; j += 8) {
    const __m256 vis = visible8(m, j, T), keep = keep8(key, j, thr);
    const __m256 x = _mm256_fmsub_ps(load8(s + j, T - j), _mm256_set1_ps(scale), _mm256_set1_ps(lse));
    const __m256 p = _mm256_and_ps(vis, exp_nonpositive(x));
    store8(s + j, _mm256_and_ps(keep, _mm256_mul_ps(p, _mm256_set1_ps(keep_scale))), T - j);
    const __m256 dp = _mm256_and_ps(keep, _mm256_mul_ps(load8(g + j, T - j), _mm256_set1_ps(keep_scale)));
    const __m256 ds = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(dp, _mm256_set1_ps(delta))), _mm256_set1_ps(scale));
    store8(g + j, ds, T - j);
  }
}

template <typename T>
void dropout_rows(const T* x, T* y, int64_t n, int64_t c0, int64_t c1, int64_t seed, uint32_t thr, float f) {
  for (int64_t c = c0; c < c1; c++) {
    const uint64_t key = row_key(seed, c);
    const int64_t end = std::min(n, (c + 1) * DROPOUT_ROW);
    for (int64_t i = c * DROPOUT_ROW; i < end; i += 8) {
      const __m256 keep = keep8(key, i - c * DROPOUT_ROW, thr);
      store8(y + i, _mm256_and_ps(keep, _mm256_mul_ps(load8(x + i, end - i), _mm256_set1_ps(f))), end - i);
    }
  }
}

#endif

void check_scores(const at::Tensor& s, const at::Tensor& mask, const char* name) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kBFloat16 && s.dim() == 3 && s.is_contiguous(), name,
              ": scores must be contiguous bf16 [batch * heads, S, T]");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3 && mask.size(1) == s.size(1) &&
                  mask.size(2) == s.size(2) && mask.stride(2) == 1 && mask.stride(1) == s.size(2) &&
                  s.size(0) % mask.size(0) == 0,
              name, ": mask must be bool [batch or 1, S, T] with contiguous rows");
  TORCH_CHECK(s.size(2) < (int64_t(1) << 31), name, ": too many keys");
}

// the mask row of query row r of scores [BH, S, T] (mask rows may repeat over batch with stride 0)
const bool* mask_row(const at::Tensor& mask, int64_t BH, int64_t S, int64_t r) {
  const int64_t heads = BH / mask.size(0);
  return mask.data_ptr<bool>() + (r / S / heads) * mask.stride(0) + (r % S) * mask.stride(1);
}

// the seed is a 0-dim int64 tensor drawn from torch's generator (a tensor, so torch.compile traces the draw)
int64_t seed_value(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "seed: expected one int64 on the CPU");
  return seed.item<int64_t>();
}

at::Tensor attention_probs(at::Tensor scores, const at::Tensor& mask, double scale, double p,
                           const at::Tensor& seed_t) {
  check_scores(scores, mask, "attention_probs_");
  const int64_t seed = seed_value(seed_t);
  const int64_t BH = scores.size(0), S = scores.size(1), T = scores.size(2);
  const uint32_t thr = drop_threshold(p);
  at::Tensor lse = at::empty({BH, S}, scores.options().dtype(at::kFloat));
  auto* sp = scores.data_ptr<c10::BFloat16>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, BH * S, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(T + 16);
    for (int64_t r = r0; r < r1; r++)
      lp[r] = probs_row(sp + r * T, mask_row(mask, BH, S, r), T, static_cast<float>(scale), row_key(seed, r), thr,
                        static_cast<float>(1.0 / (1.0 - p)), buf.data());
  });
  return lse;
}

void attention_probs_backward(at::Tensor scores, at::Tensor grad, const at::Tensor& lse, const at::Tensor& delta,
                              const at::Tensor& mask, double scale, double p, const at::Tensor& seed_t) {
  check_scores(scores, mask, "attention_probs_backward_");
  const int64_t seed = seed_value(seed_t);
  TORCH_CHECK(grad.sizes() == scores.sizes() && grad.scalar_type() == at::kBFloat16 && grad.is_contiguous(),
              "attention_probs_backward_: grad must be contiguous bf16 like scores");
  const int64_t BH = scores.size(0), S = scores.size(1), T = scores.size(2);
  for (const at::Tensor* t : {&lse, &delta})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == BH * S,
                "attention_probs_backward_: lse and delta must be contiguous fp32 [batch * heads, S]");
  const uint32_t thr = drop_threshold(p);
  auto* sp = scores.data_ptr<c10::BFloat16>();
  auto* gp = grad.data_ptr<c10::BFloat16>();
  const float* lp = lse.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  at::parallel_for(0, BH * S, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
      probs_row_backward(sp + r * T, gp + r * T, mask_row(mask, BH, S, r), T, static_cast<float>(scale), lp[r],
                         dp[r], row_key(seed, r), thr, static_cast<float>(1.0 / (1.0 - p)));
  });
}

// x * keep / (1 - p); the same seed gives the same keep bits, so the gradient is this op applied to dL/dy
at::Tensor dropout(const at::Tensor& x_in, double p, const at::Tensor& seed_t) {
  const int64_t seed = seed_value(seed_t);
  TORCH_CHECK(x_in.device().is_cpu() && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "dropout: x must be an fp32 or bf16 CPU tensor");
  const uint32_t thr = drop_threshold(p);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel(), rows = (n + DROPOUT_ROW - 1) / DROPOUT_ROW;
  const float f = static_cast<float>(1.0 / (1.0 - p));
  at::parallel_for(0, rows, 4, [&](int64_t c0, int64_t c1) {
    if (x.scalar_type() == at::kFloat)
      dropout_rows(x.data_ptr<float>(), y.data_ptr<float>(), n, c0, c1, seed, thr, f);
    else
      dropout_rows(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), n, c0, c1, seed, thr, f);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glmkit_kernels, m) {
  m.def("attention_probs_(Tensor(a!) scores, Tensor mask, float scale, float p, Tensor seed) -> Tensor");
  m.def(
      "attention_probs_backward_(Tensor(a!) scores, Tensor(b!) grad, Tensor lse, Tensor delta, Tensor mask, "
      "float scale, float p, Tensor seed) -> ()");
  m.def("dropout(Tensor x, float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(glmkit_kernels, CPU, m) {
  m.impl("attention_probs_", &attention_probs);
  m.impl("attention_probs_backward_", &attention_probs_backward);
  m.impl("dropout", &dropout);
}
