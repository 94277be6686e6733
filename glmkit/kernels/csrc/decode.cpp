// Every GLM block of one decode step in one call (glmkit.generate.fast): one new token per row, bf16 activations.
//
// A decode step of GLM-Large is ~15 ms of weight streaming plus, in Python, ~3 ms of everything else: 24 layers of
// LayerNorm, attention over the cache, GELU and residual adds, each a Python-dispatched op costing more than its
// arithmetic (benchmarks/RESULTS.md). Here that glue runs in C++ on AVX-512, with the Python path's numerics (fp32
// math, one rounding to bf16 per op): LayerNorm, tanh-GELU (erf-GELU through ATen) and in-place residual adds; the
// matmuls are linear.cpp's kernels called directly, and attention of the single new query per row is a small loop
// over that row's cache, written into the fp32 cache in place. Rows may hold different numbers of cached tokens
// (continuous batching).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attend.h"
#include "linear.h"
#include "simd.h"

using glmkit::exp_nonpositive;
using glmkit::attend::attend_head_any;
using glmkit::attend::MAX_HEAD_SIZE;
using glmkit::attend::rotate;
#if defined(GLMKIT_ISA_AVX512)
using glmkit::load_bf16;
using glmkit::store_bf16;
using glmkit::tail;
#else
using glmkit::load8;
using glmkit::store8;
#endif

namespace {

constexpr int64_t PER_BLOCK = 16;  // tensors per block: ln1 w, b; ln2 w, b; qkv, proj, fc, mlp proj as (w, scales, bias)
constexpr int64_t META_PER_BLOCK = 8;  // (kind, group size) for each of the 4 linears
constexpr int64_t ELEMENTWISE_GRAIN = 16384;  // values per thread below which GELU and adds stay on one thread

enum Kind : int64_t { BF16 = 0, INT8 = 1, INT4 = 2, INT4X16 = 3 };  // glmkit/generate/fast.py: _fused_linear

c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// w, scales, bias = t[0], t[1], t[2]; empty tensors stand for "none"; a bf16 weight's t[1] may hold its panels
// (packed.cpp), which every batch multiplies with
at::Tensor run_linear(const at::Tensor* t, int64_t kind, int64_t group, const at::Tensor& x) {
  switch (kind) {
    case BF16:
      if (t[1].defined() && t[1].numel()) return glmkit::linear_packed_bf16(x, t[1], t[0].size(0), present(t[2]));
      return glmkit::linear_bf16(x, t[0], present(t[2]));
    case INT8:
      return glmkit::linear_int8(x, t[0], t[1], present(t[2]));
    case INT4X16:
      return glmkit::linear_int4x16(x, t[0], t[1], group, present(t[2]));
    default:
      return glmkit::linear_int4(x, t[0], t[1], group, present(t[2]));
  }
}

#if defined(GLMKIT_ISA_AVX512)

// out[m] = LayerNorm(x[m]) * w + b for rows m0..m1 of C bf16 values (mean and variance in fp32, two passes)
void layer_norm_rows(const c10::BFloat16* xp, const c10::BFloat16* wp, const c10::BFloat16* bp, float eps,
                            int64_t C, int64_t m0, int64_t m1, c10::BFloat16* op) {
  for (int64_t m = m0; m < m1; m++) {
    const c10::BFloat16* r = xp + m * C;
    __m512 s = _mm512_setzero_ps();
    for (int64_t i = 0; i < C; i += 16) s = _mm512_add_ps(s, load_bf16(r + i, tail(C, i)));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / C);
    __m512 v = _mm512_setzero_ps();
    for (int64_t i = 0; i < C; i += 16) {
      const __mmask16 t = tail(C, i);
      const __m512 d = _mm512_maskz_sub_ps(t, load_bf16(r + i, t), mean);
      v = _mm512_fmadd_ps(d, d, v);
    }
    const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(v) / C + eps));
    for (int64_t i = 0; i < C; i += 16) {
      const __mmask16 t = tail(C, i);
      const __m512 n = _mm512_mul_ps(_mm512_sub_ps(load_bf16(r + i, t), mean), rstd);
      store_bf16(op + m * C + i, _mm512_fmadd_ps(n, load_bf16(wp + i, t), load_bf16(bp + i, t)), t);
    }
  }
}

// p[i0..i1) = 0.5 p (1 + tanh(sqrt(2 / pi) (p + 0.044715 p^3))), tanh(u) = sign(u) (1 - e) / (1 + e), e = e^-2|u|
void gelu_tanh_range(c10::BFloat16* p, int64_t i0, int64_t i1) {
  const __m512 k0 = _mm512_set1_ps(0.7978845608028654f), k1 = _mm512_set1_ps(0.044715f), one = _mm512_set1_ps(1.f);
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 t = tail(i1, i);
    const __m512 v = load_bf16(p + i, t);
    const __m512 u = _mm512_mul_ps(k0, _mm512_fmadd_ps(_mm512_mul_ps(k1, v), _mm512_mul_ps(v, v), v));
    const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(u)));
    __m512 th = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    th = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(th),  // sign of u
                                             _mm512_and_si512(_mm512_castps_si512(u), _mm512_set1_epi32(INT32_MIN))));
    store_bf16(p + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(one, th)), t);
  }
}

// x[i0..i1) += y[i0..i1) (bf16, rounded once)
void add_range(c10::BFloat16* x, const c10::BFloat16* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 t = tail(i1, i);
    store_bf16(x + i, _mm512_add_ps(load_bf16(x + i, t), load_bf16(y + i, t)), t);
  }
}

#else

// AVX2 versions of the three, the same math 8 values at a time
void layer_norm_rows(const c10::BFloat16* xp, const c10::BFloat16* wp, const c10::BFloat16* bp, float eps, int64_t C,
                     int64_t m0, int64_t m1, c10::BFloat16* op) {
  for (int64_t m = m0; m < m1; m++) {
    const c10::BFloat16* r = xp + m * C;
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < C; i += 8) s = _mm256_add_ps(s, load8(r + i, C - i));
    const __m256 mean = _mm256_set1_ps(glmkit::hsum(s) / C);
    __m256 v = _mm256_setzero_ps();
    for (int64_t i = 0; i < C; i += 8) {
      const __m256 d = _mm256_and_ps(_mm256_sub_ps(load8(r + i, C - i), mean),
                                     _mm256_castsi256_ps(glmkit::tail8(C - i)));
      v = _mm256_fmadd_ps(d, d, v);
    }
    const __m256 rstd = _mm256_set1_ps(1.f / std::sqrt(glmkit::hsum(v) / C + eps));
    for (int64_t i = 0; i < C; i += 8) {
      const __m256 n = _mm256_mul_ps(_mm256_sub_ps(load8(r + i, C - i), mean), rstd);
      store8(op + m * C + i, _mm256_fmadd_ps(n, load8(wp + i, C - i), load8(bp + i, C - i)), C - i);
    }
  }
}

void gelu_tanh_range(c10::BFloat16* p, int64_t i0, int64_t i1) {
  const __m256 k0 = _mm256_set1_ps(0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f), one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN));
  for (int64_t i = i0; i < i1; i += 8) {
    const __m256 v = load8(p + i, i1 - i);
    const __m256 u = _mm256_mul_ps(k0, _mm256_fmadd_ps(_mm256_mul_ps(k1, v), _mm256_mul_ps(v, v), v));
    const __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_set1_ps(-2.f), _mm256_andnot_ps(sign, u)));
    __m256 th = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    th = _mm256_or_ps(th, _mm256_and_ps(u, sign));
    store8(p + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, th)), i1 - i);
  }
}

void add_range(c10::BFloat16* x, const c10::BFloat16* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += 8) store8(x + i, _mm256_add_ps(load8(x + i, i1 - i), load8(y + i, i1 - i)), i1 - i);
}

#endif

void layer_norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor& out) {
  const int64_t C = x.size(1);
  const auto *xp = x.data_ptr<c10::BFloat16>(), *wp = w.data_ptr<c10::BFloat16>(), *bp = b.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, x.size(0), ELEMENTWISE_GRAIN / C + 1, [&](int64_t m0, int64_t m1) {
    layer_norm_rows(xp, wp, bp, static_cast<float>(eps), C, m0, m1, op);
  });
}

// f(i0, i1) over [0, n) in chunks of whole 16-value vectors, on several threads once n is large enough
template <typename F>
void elementwise(int64_t n, const F& f) {
  at::parallel_for(0, (n + 15) / 16, ELEMENTWISE_GRAIN / 16, [&](int64_t c0, int64_t c1) {
    f(c0 * 16, std::min(n, c1 * 16));
  });
}

void gelu_tanh(at::Tensor& x) {
  auto* p = x.data_ptr<c10::BFloat16>();
  elementwise(x.numel(), [&](int64_t i0, int64_t i1) { gelu_tanh_range(p, i0, i1); });
}

void add_into(at::Tensor& x, const at::Tensor& y) {
  auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* yp = y.data_ptr<c10::BFloat16>();
  elementwise(x.numel(), [&](int64_t i0, int64_t i1) { add_range(xp, yp, i0, i1); });
}

// qkv [B, 3C] (bf16, rows Q | K | V head-major); rope: none, or [B, 2, D / 2] (cos, sin of 2D rotary positions)
// turning each head's q and k before k is cached; writes each row's k, v at its length in its cache slot (an fp32 or
// bf16 cache: bf16 holds a bf16 model's k and v exactly, rotated k rounded once, and halves the bytes attention
// reads), attends over the slot's tokens 0..length, returns y [B, C] in bf16 (what SDPA then .to(bf16) gives the
// Python path)
template <typename CT>
at::Tensor attend_rows(const at::Tensor& qkv, at::Tensor& kc, at::Tensor& vc, int64_t layer, at::IntArrayRef slots,
                  at::IntArrayRef lengths, int64_t H, const float* rope) {
  const int64_t B = qkv.size(0), C = qkv.size(1) / 3, D = C / H, P = kc.size(1), Tmax = kc.size(3);
  const auto* qp = qkv.data_ptr<c10::BFloat16>();
  CT* kp = kc.data_ptr<CT>() + layer * P * H * Tmax * D;
  CT* vp = vc.data_ptr<CT>() + layer * P * H * Tmax * D;
  auto y = at::empty({B, C}, qkv.options());
  auto* yp = y.data_ptr<c10::BFloat16>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  // bf16 <-> fp32 per head here rather than two ATen casts of the whole rows: each costs more than a head's work
  auto widen = [](const c10::BFloat16* src, float* dst, int64_t n) {
    for (int64_t d = 0; d < n; d++) dst[d] = static_cast<float>(src[d]);
  };
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(Tmax);
    float q[MAX_HEAD_SIZE], k[MAX_HEAD_SIZE], out[MAX_HEAD_SIZE];
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / H, h = i % H, n = lengths[b];
      const c10::BFloat16* row = qp + b * 3 * C;
      CT* K = kp + (slots[b] * H + h) * Tmax * D;
      CT* V = vp + (slots[b] * H + h) * Tmax * D;
      widen(row + h * D, q, D);
      widen(row + C + h * D, k, D);
      if (rope) {
        const float* c = rope + b * D;
        rotate(q, c, c + D / 2, D, q);
        rotate(k, c, c + D / 2, D, k);
      }
      for (int64_t d = 0; d < D; d++) {
        K[n * D + d] = CT(k[d]);
        V[n * D + d] = CT(static_cast<float>(row[2 * C + h * D + d]));
      }
      attend_head_any<CT, true>(q, K, V, nullptr, n + 1, D, scale, s.data(), out);
      for (int64_t d = 0; d < D; d++) yp[b * C + h * D + d] = c10::BFloat16(out[d]);
    }
  });
  return y;
}

}  // namespace

namespace glmkit {

at::Tensor decode_blocks(const at::Tensor& x_in, at::TensorList tensors, at::IntArrayRef meta, at::Tensor k_cache,
                         at::Tensor v_cache, at::IntArrayRef slots, at::IntArrayRef lengths,
                         const c10::optional<at::Tensor>& rope, int64_t n_head, double eps, c10::string_view gelu) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kBFloat16 && x_in.dim() == 2,
              "decode_blocks: x must be a bf16 CPU tensor [B, C]");
  const int64_t B = x_in.size(0), C = x_in.size(1);
  const int64_t L = static_cast<int64_t>(tensors.size()) / PER_BLOCK;
  TORCH_CHECK(n_head > 0 && C % n_head == 0 && C / n_head <= MAX_HEAD_SIZE, "decode_blocks: head size above ",
              MAX_HEAD_SIZE);
  TORCH_CHECK(L > 0 && static_cast<int64_t>(tensors.size()) == L * PER_BLOCK, "decode_blocks: ", PER_BLOCK,
              " tensors per block, got ", tensors.size());
  TORCH_CHECK(static_cast<int64_t>(meta.size()) == L * META_PER_BLOCK, "decode_blocks: linear_meta must hold ",
              META_PER_BLOCK, " ints per block");
  for (const auto* c : {&k_cache, &v_cache})
    TORCH_CHECK((c->scalar_type() == at::kFloat || c->scalar_type() == at::kBFloat16) &&
                    c->scalar_type() == k_cache.scalar_type() && c->is_contiguous() && c->dim() == 5 &&
                    c->size(0) == L && c->size(2) == n_head && c->size(2) * c->size(4) == C,
                "decode_blocks: caches must be contiguous fp32 or bf16 [L, slots, n_head, T, C / n_head]");
  TORCH_CHECK(static_cast<int64_t>(slots.size()) == B && static_cast<int64_t>(lengths.size()) == B,
              "decode_blocks: one slot and one length per row");
  for (int64_t b = 0; b < B; b++)
    TORCH_CHECK(0 <= slots[b] && slots[b] < k_cache.size(1) && 0 <= lengths[b] && lengths[b] < k_cache.size(3),
                "decode_blocks: row ", b, " has slot ", slots[b], " and length ", lengths[b], " outside the cache");
  if (rope)
    TORCH_CHECK(rope->scalar_type() == at::kFloat && rope->is_contiguous() && rope->dim() == 3 && rope->size(0) == B &&
                    rope->size(1) == 2 && rope->size(2) * 2 * n_head == C,
                "decode_blocks: rope must be contiguous fp32 [B, 2, head_size / 2] (cos, sin)");
  const float* rp = rope ? rope->data_ptr<float>() : nullptr;
  const bool tanh_gelu = gelu == "tanh";
  for (int64_t i = 0; i < L * 4; i++)
    TORCH_CHECK(tensors[(i / 4) * PER_BLOCK + i % 4].scalar_type() == at::kBFloat16 &&
                    tensors[(i / 4) * PER_BLOCK + i % 4].is_contiguous(),
                "decode_blocks: LayerNorm weights and biases must be contiguous bf16");
  at::Tensor x = x_in.clone(at::MemoryFormat::Contiguous);  // the residual stream, updated in place
  at::Tensor h = at::empty_like(x);
  for (int64_t l = 0; l < L; l++) {
    const at::Tensor* t = tensors.data() + l * PER_BLOCK;
    const int64_t* m = meta.data() + l * META_PER_BLOCK;
    layer_norm(x, t[0], t[1], eps, h);
    auto qkv = run_linear(t + 4, m[0], m[1], h);
    const at::Tensor y = k_cache.scalar_type() == at::kFloat
                             ? attend_rows<float>(qkv, k_cache, v_cache, l, slots, lengths, n_head, rp)
                             : attend_rows<c10::BFloat16>(qkv, k_cache, v_cache, l, slots, lengths, n_head, rp);
    add_into(x, run_linear(t + 7, m[2], m[3], y));
    layer_norm(x, t[2], t[3], eps, h);
    auto f = run_linear(t + 10, m[4], m[5], h);
    if (tanh_gelu)
      gelu_tanh(f);
    else
      f = at::gelu(f, gelu);
    add_into(x, run_linear(t + 13, m[6], m[7], f));
  }
  return x;
}

at::Tensor gelu_tanh_bf16(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "gelu_tanh: x must be a bf16 CPU tensor");
  at::Tensor y = x.clone(at::MemoryFormat::Contiguous);
  gelu_tanh(y);
  return y;
}

}  // namespace glmkit
