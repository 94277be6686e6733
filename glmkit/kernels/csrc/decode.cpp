// Every block of one decode step in one call (glmkit.generate.fast): one new token per row, bf16 activations. Three
// block styles: GLM's (LayerNorm, GELU MLP, one KV head per head, pre-LN residuals), ChatGLM-6B's (GLM's with per-head
// QKV rows, rotate-half 2D rotary and the residual LN(x) * alpha + f(LN(x))) and ChatGLM2/3/GLM-4's (RMSNorm, SwiGLU
// MLP, grouped KV heads, 1-D rotary on part of each head: the rope table turns the rest by 0).
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

// per block (glmkit/kernels/layout.py): ln1 w, b; ln2 w, b; qkv, proj, fc, mlp proj as (w, scales, bias); and
// (kind, group size) for each of the 4 linears
constexpr int64_t PER_BLOCK = GLMKIT_DECODE_TENSORS_PER_BLOCK;
constexpr int64_t META_PER_BLOCK = GLMKIT_DECODE_META_PER_BLOCK;
static_assert(PER_BLOCK == 4 + 3 * 4 && META_PER_BLOCK == 2 * 4, "decode_blocks reads 2 norms and 4 linears");
constexpr int64_t ELEMENTWISE_GRAIN = 16384;  // values per thread below which GELU and adds stay on one thread

enum Kind : int64_t {  // layout.LinearKind
  BF16 = GLMKIT_KIND_BF16,
  INT8 = GLMKIT_KIND_INT8,
  INT4 = GLMKIT_KIND_INT4,
  INT4X16 = GLMKIT_KIND_INT4X16,
};

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
    case INT4:
      return glmkit::linear_int4(x, t[0], t[1], group, present(t[2]));
  }
  TORCH_CHECK(false, "decode_blocks: unknown linear kind ", kind);
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

// out[m] = bf16(bf16(x[m] / sqrt(mean(x[m]^2) + eps)) * w): torch's RMSNorm on bf16 (fp32 math, the normalized value
// rounded before the weight multiplies it)
void rms_norm_rows(const c10::BFloat16* xp, const c10::BFloat16* wp, float eps, int64_t C, int64_t m0, int64_t m1,
                   c10::BFloat16* op) {
  for (int64_t m = m0; m < m1; m++) {
    const c10::BFloat16* r = xp + m * C;
    __m512 v = _mm512_setzero_ps();
    for (int64_t i = 0; i < C; i += 16) {
      const __m512 a = load_bf16(r + i, tail(C, i));
      v = _mm512_fmadd_ps(a, a, v);
    }
    const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(v) / C + eps));
    for (int64_t i = 0; i < C; i += 16) {
      const __mmask16 t = tail(C, i);
      const __m512 n = glmkit::round_bf16(_mm512_mul_ps(load_bf16(r + i, t), rstd));
      store_bf16(op + m * C + i, _mm512_mul_ps(n, load_bf16(wp + i, t)), t);
    }
  }
}

// out[i] = bf16(bf16(silu(g[i])) * u[i]) for i in [i0, i1), g = f[:, :F], u = f[:, F:] of rows of 2F values
void swiglu_range(const c10::BFloat16* f, int64_t F, c10::BFloat16* out, int64_t i0, int64_t i1) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = i0; i < i1;) {
    const int64_t m = i / F, j = i % F, n = std::min(i1 - i, F - j);  // a run within one row
    const c10::BFloat16 *g = f + m * 2 * F + j, *u = g + F;
    for (int64_t c = 0; c < n; c += 16) {
      const __mmask16 t = tail(n, c);
      const __m512 gv = load_bf16(g + c, t);
      const __m512 e = glmkit::exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
      // sigmoid(g) = 1 / (1 + e^-g): for g < 0 from e^g / (1 + e^g), so that the exponent is never positive
      const __m512 sig = _mm512_mask_div_ps(_mm512_div_ps(one, _mm512_add_ps(one, e)),
                                            _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ),
                                            e, _mm512_add_ps(one, e));
      const __m512 act = glmkit::round_bf16(_mm512_mul_ps(gv, sig));
      store_bf16(out + i + c, _mm512_mul_ps(act, load_bf16(u + c, t)), t);
    }
    i += n;
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

void rms_norm_rows(const c10::BFloat16* xp, const c10::BFloat16* wp, float eps, int64_t C, int64_t m0, int64_t m1,
                   c10::BFloat16* op) {
  for (int64_t m = m0; m < m1; m++) {
    const c10::BFloat16* r = xp + m * C;
    __m256 v = _mm256_setzero_ps();
    for (int64_t i = 0; i < C; i += 8) {
      const __m256 a = load8(r + i, C - i);
      v = _mm256_fmadd_ps(a, a, v);
    }
    const __m256 rstd = _mm256_set1_ps(1.f / std::sqrt(glmkit::hsum(v) / C + eps));
    for (int64_t i = 0; i < C; i += 8) {
      const __m256 n = glmkit::round_bf16(_mm256_mul_ps(load8(r + i, C - i), rstd));
      store8(op + m * C + i, _mm256_mul_ps(n, load8(wp + i, C - i)), C - i);
    }
  }
}

void swiglu_range(const c10::BFloat16* f, int64_t F, c10::BFloat16* out, int64_t i0, int64_t i1) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN));
  for (int64_t i = i0; i < i1;) {
    const int64_t m = i / F, j = i % F, n = std::min(i1 - i, F - j);
    const c10::BFloat16 *g = f + m * 2 * F + j, *u = g + F;
    for (int64_t c = 0; c < n; c += 8) {
      const __m256 gv = load8(g + c, n - c);
      const __m256 e = exp_nonpositive(_mm256_or_ps(_mm256_andnot_ps(sign, gv), sign));  // e^-|g|
      const __m256 d = _mm256_add_ps(one, e);
      const __m256 sig = _mm256_blendv_ps(_mm256_div_ps(one, d), _mm256_div_ps(e, d), _mm256_cmp_ps(gv, zero, _CMP_LT_OQ));
      const __m256 act = glmkit::round_bf16(_mm256_mul_ps(gv, sig));
      store8(out + i + c, _mm256_mul_ps(act, load8(u + c, n - c)), n - c);
    }
    i += n;
  }
}

#endif

// LayerNorm with weight and bias, or RMSNorm with the weight alone (b empty)
void norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor& out) {
  const int64_t C = x.size(1);
  const auto *xp = x.data_ptr<c10::BFloat16>(), *wp = w.data_ptr<c10::BFloat16>();
  const auto* bp = b.numel() ? b.data_ptr<c10::BFloat16>() : nullptr;
  auto* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, x.size(0), ELEMENTWISE_GRAIN / C + 1, [&](int64_t m0, int64_t m1) {
    if (bp)
      layer_norm_rows(xp, wp, bp, static_cast<float>(eps), C, m0, m1, op);
    else
      rms_norm_rows(xp, wp, static_cast<float>(eps), C, m0, m1, op);
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

// silu(f[:, :F]) * f[:, F:] for f [B, 2F]
at::Tensor swiglu(const at::Tensor& f) {
  const int64_t F = f.size(1) / 2;
  auto out = at::empty({f.size(0), F}, f.options());
  const auto* fp = f.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  elementwise(out.numel(), [&](int64_t i0, int64_t i1) { swiglu_range(fp, F, op, i0, i1); });
  return out;
}

void add_into(at::Tensor& x, const at::Tensor& y) {
  auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* yp = y.data_ptr<c10::BFloat16>();
  elementwise(x.numel(), [&](int64_t i0, int64_t i1) { add_range(xp, yp, i0, i1); });
}

// out = x turned pair by pair where the pairs are rotate-half ones (GPT-NeoX's layout) within each of `halves` equal
// segments of the head: element j of a segment with element j + segment / 2, pair p = segment index * segment / 2 + j
// taking c[p], s[p]. ChatGLM-6B has two segments (position, block position). Rounded as the Python path's
// x * cos + rotate_half(x) * sin (each product, then the sum: no fused multiply-add); out may be x.
__attribute__((optimize("fp-contract=off"))) void rotate_halves(const float* x, const float* c, const float* s,
                                                                 int64_t D, int64_t halves, float* out) {
  const int64_t seg = D / halves, q = seg / 2;
  for (int64_t g = 0; g < halves; g++) {
    const float *cg = c + g * q, *sg = s + g * q;
    for (int64_t j = 0; j < q; j++) {
      const float a = x[g * seg + j], b = x[g * seg + j + q];
      out[g * seg + j] = a * cg[j] - b * sg[j];
      out[g * seg + j + q] = b * cg[j] + a * sg[j];
    }
  }
}

// x[i] = bf16(bf16(h[i] * alpha) + y[i]): ChatGLM-6B's residual, which adds the normalized input scaled by alpha
void scale_add_into(at::Tensor& x, const at::Tensor& h, const at::Tensor& y, float alpha) {
  auto* xp = x.data_ptr<c10::BFloat16>();
  const auto *hp = h.data_ptr<c10::BFloat16>(), *yp = y.data_ptr<c10::BFloat16>();
  elementwise(x.numel(), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++)
      xp[i] = c10::BFloat16(static_cast<float>(c10::BFloat16(static_cast<float>(hp[i]) * alpha)) +
                            static_cast<float>(yp[i]));
  });
}

// Where a head's q, k and v sit in a row of the QKV projection's output: head-major blocks Q | K | V, or per head
// (ChatGLM-6B: q, k, v of head 0, then of head 1, ...; one KV head per head)
struct QkvLayout {
  int64_t q_stride, k_start, v_start, kv_stride;
  QkvLayout(bool per_head, int64_t H, int64_t G, int64_t D)
      : q_stride(per_head ? 3 * D : D),
        k_start(per_head ? D : H * D),
        v_start(per_head ? 2 * D : (H + G) * D),
        kv_stride(per_head ? 3 * D : D) {}
};

// qkv [B, (H + 2G) D] (bf16, laid out as `lay` says: H query heads, G key/value heads, each shared by H / G
// consecutive query heads); rope: none, or [B, 2, D / 2] (cos, sin of each pair's angle) turning each head's q and k
// before k is cached, adjacent pairs (rope_halves 0) or rotate-half pairs in rope_halves segments; writes each row's k, v at its length in its cache slot (an fp32 or bf16 cache: bf16 holds a
// bf16 model's k and v exactly, rotated k rounded once, and halves the bytes attention reads), attends over the
// slot's tokens 0..length, returns y [B, H D] in bf16 (what SDPA then .to(bf16) gives the Python path)
template <typename CT>
at::Tensor attend_rows(const at::Tensor& qkv, at::Tensor& kc, at::Tensor& vc, int64_t layer, at::IntArrayRef slots,
                       at::IntArrayRef lengths, int64_t H, const QkvLayout& lay, const float* rope,
                       int64_t rope_halves) {
  const int64_t B = qkv.size(0), G = kc.size(2), D = kc.size(4), P = kc.size(1), Tmax = kc.size(3);
  const int64_t W = qkv.size(1), C = H * D;
  const auto* qp = qkv.data_ptr<c10::BFloat16>();
  CT* kp = kc.data_ptr<CT>() + layer * P * G * Tmax * D;
  CT* vp = vc.data_ptr<CT>() + layer * P * G * Tmax * D;
  auto y = at::empty({B, C}, qkv.options());
  auto* yp = y.data_ptr<c10::BFloat16>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  // bf16 <-> fp32 per head here rather than two ATen casts of the whole rows: each costs more than a head's work
  auto widen = [](const c10::BFloat16* src, float* dst, int64_t n) {
    for (int64_t d = 0; d < n; d++) dst[d] = static_cast<float>(src[d]);
  };
  auto turn = [&](float* v, int64_t b) {
    if (rope && rope_halves)
      rotate_halves(v, rope + b * D, rope + b * D + D / 2, D, rope_halves, v);
    else if (rope)
      rotate(v, rope + b * D, rope + b * D + D / 2, D, v);
  };
  // the new keys and values first: every query head of a group reads them (one row's heads stay on one thread)
  at::parallel_for(0, B * G, 64, [&](int64_t i0, int64_t i1) {
    float k[MAX_HEAD_SIZE];
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / G, g = i % G, n = lengths[b];
      const c10::BFloat16* row = qp + b * W;
      widen(row + lay.k_start + g * lay.kv_stride, k, D);
      turn(k, b);
      CT* K = kp + ((slots[b] * G + g) * Tmax + n) * D;
      CT* V = vp + ((slots[b] * G + g) * Tmax + n) * D;
      for (int64_t d = 0; d < D; d++) {
        K[d] = CT(k[d]);
        V[d] = CT(static_cast<float>(row[lay.v_start + g * lay.kv_stride + d]));
      }
    }
  });
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(Tmax);
    float q[MAX_HEAD_SIZE], out[MAX_HEAD_SIZE];
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / H, h = i % H, g = h / (H / G);
      widen(qp + b * W + h * lay.q_stride, q, D);
      turn(q, b);
      const CT* K = kp + (slots[b] * G + g) * Tmax * D;
      const CT* V = vp + (slots[b] * G + g) * Tmax * D;
      attend_head_any<CT, true>(q, K, V, nullptr, lengths[b] + 1, D, scale, s.data(), out);
      for (int64_t d = 0; d < D; d++) yp[b * C + h * D + d] = c10::BFloat16(out[d]);
    }
  });
  return y;
}

}  // namespace

namespace glmkit {

at::Tensor decode_blocks(const at::Tensor& x_in, at::TensorList tensors, at::IntArrayRef meta, at::Tensor k_cache,
                         at::Tensor v_cache, at::IntArrayRef slots, at::IntArrayRef lengths,
                         const c10::optional<at::Tensor>& rope, int64_t n_head, double eps,
                         c10::string_view activation, bool qkv_per_head, int64_t rope_halves,
                         double residual_alpha) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kBFloat16 && x_in.dim() == 2,
              "decode_blocks: x must be a bf16 CPU tensor [B, C]");
  const int64_t B = x_in.size(0);
  const int64_t L = static_cast<int64_t>(tensors.size()) / PER_BLOCK;
  TORCH_CHECK(L > 0 && static_cast<int64_t>(tensors.size()) == L * PER_BLOCK, "decode_blocks: ", PER_BLOCK,
              " tensors per block, got ", tensors.size());
  TORCH_CHECK(static_cast<int64_t>(meta.size()) == L * META_PER_BLOCK, "decode_blocks: linear_meta must hold ",
              META_PER_BLOCK, " ints per block");
  for (const auto* c : {&k_cache, &v_cache})
    TORCH_CHECK((c->scalar_type() == at::kFloat || c->scalar_type() == at::kBFloat16) &&
                    c->scalar_type() == k_cache.scalar_type() && c->is_contiguous() && c->dim() == 5 &&
                    c->sizes() == k_cache.sizes() && c->size(0) == L,
                "decode_blocks: caches must be contiguous fp32 or bf16 [L, slots, kv_heads, T, head_size]");
  const int64_t G = k_cache.size(2), D = k_cache.size(4);
  TORCH_CHECK(n_head > 0 && G > 0 && n_head % G == 0 && D <= MAX_HEAD_SIZE,
              "decode_blocks: ", n_head, " heads in ", G, " KV groups of head size ", D, " (at most ", MAX_HEAD_SIZE,
              ")");
  TORCH_CHECK(static_cast<int64_t>(slots.size()) == B && static_cast<int64_t>(lengths.size()) == B,
              "decode_blocks: one slot and one length per row");
  for (int64_t b = 0; b < B; b++)
    TORCH_CHECK(0 <= slots[b] && slots[b] < k_cache.size(1) && 0 <= lengths[b] && lengths[b] < k_cache.size(3),
                "decode_blocks: row ", b, " has slot ", slots[b], " and length ", lengths[b], " outside the cache");
  if (rope)
    TORCH_CHECK(rope->scalar_type() == at::kFloat && rope->is_contiguous() && rope->dim() == 3 && rope->size(0) == B &&
                    rope->size(1) == 2 && rope->size(2) * 2 == D,
                "decode_blocks: rope must be contiguous fp32 [B, 2, head_size / 2] (cos, sin)");
  const float* rp = rope ? rope->data_ptr<float>() : nullptr;
  TORCH_CHECK(!qkv_per_head || G == n_head, "decode_blocks: per-head QKV rows need one KV head per head, got ", G,
              " for ", n_head);
  TORCH_CHECK(rope_halves >= 0 && (rope_halves == 0 || D % (2 * rope_halves) == 0), "decode_blocks: rope_halves ",
              rope_halves, " does not split a head of ", D, " into rotate-half segments");
  TORCH_CHECK(residual_alpha >= 0, "decode_blocks: residual_alpha must be 0 (x + f(LN(x))) or positive");
  const QkvLayout qkv_at(qkv_per_head, n_head, G, D);
  const float alpha = static_cast<float>(residual_alpha);
  TORCH_CHECK(activation == "tanh" || activation == "none" || activation == "swiglu",
              "decode_blocks: activation must be tanh or none (GELU's approximate) or swiglu");
  for (int64_t l = 0; l < L; l++) {
    const at::Tensor* t = tensors.data() + l * PER_BLOCK;
    for (int i = 0; i < 4; i++)
      TORCH_CHECK(t[i].numel() == 0 || (t[i].scalar_type() == at::kBFloat16 && t[i].is_contiguous()),
                  "decode_blocks: norm weights and biases must be contiguous bf16");
    TORCH_CHECK(t[0].numel() == x_in.size(1) && t[2].numel() == x_in.size(1), "decode_blocks: block ", l,
                " has no norm weights of the hidden size");
  }
  at::Tensor x = x_in.clone(at::MemoryFormat::Contiguous);  // the residual stream, updated in place
  at::Tensor h = at::empty_like(x);
  // x + f(LN(x)) (pre-LN), or ChatGLM-6B's LN(x) * alpha + f(LN(x))
  auto residual = [alpha](at::Tensor& x, const at::Tensor& h, const at::Tensor& f) {
    if (alpha > 0)
      scale_add_into(x, h, f, alpha);
    else
      add_into(x, f);
  };
  for (int64_t l = 0; l < L; l++) {
    const at::Tensor* t = tensors.data() + l * PER_BLOCK;
    const int64_t* m = meta.data() + l * META_PER_BLOCK;
    norm(x, t[0], t[1], eps, h);
    auto qkv = run_linear(t + 4, m[0], m[1], h);
    TORCH_CHECK(qkv.size(1) == (n_head + 2 * G) * D, "decode_blocks: block ", l, "'s qkv has ", qkv.size(1),
                " outputs, not (heads + 2 KV heads) x head size");
    const at::Tensor y = k_cache.scalar_type() == at::kFloat
                             ? attend_rows<float>(qkv, k_cache, v_cache, l, slots, lengths, n_head, qkv_at, rp,
                                                  rope_halves)
                             : attend_rows<c10::BFloat16>(qkv, k_cache, v_cache, l, slots, lengths, n_head, qkv_at,
                                                          rp, rope_halves);
    residual(x, h, run_linear(t + 7, m[2], m[3], y));
    norm(x, t[2], t[3], eps, h);
    auto f = run_linear(t + 10, m[4], m[5], h);
    if (activation == "swiglu")
      f = swiglu(f);
    else if (activation == "tanh")
      gelu_tanh(f);
    else
      f = at::gelu(f, activation);
    residual(x, h, run_linear(t + 13, m[6], m[7], f));
  }
  return x;
}

// a model's final LayerNorm (w, b) or RMSNorm (w) of x [B, C] after decode_blocks: as the blocks' own norms, without
// the ~10 dispatched ops (~0.3 ms) of torch's bf16 RMSNorm
at::Tensor norm_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "norm: x must be a contiguous bf16 CPU tensor [B, C]");
  for (const at::Tensor* t : {&w, b ? &*b : &w})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == x.size(1),
                "norm: weight and bias must be contiguous bf16 of the hidden size ", x.size(1));
  at::Tensor out = at::empty_like(x);
  norm(x, w, b ? *b : at::empty({0}, x.options()), eps, out);
  return out;
}

at::Tensor gelu_tanh_bf16(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "gelu_tanh: x must be a bf16 CPU tensor");
  at::Tensor y = x.clone(at::MemoryFormat::Contiguous);
  gelu_tanh(y);
  return y;
}

}  // namespace glmkit
