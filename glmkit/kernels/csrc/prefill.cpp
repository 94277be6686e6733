// Attention and the 2D rotary turn of several new tokens per row (a prefill, a scoring batch) on CPU.
//
// Scoring a batch of 16 short requests with the bundled model spent ~2 ms per batch in SDPA's CPU kernel (80 heads x
// 26 queries x 26 keys: its blocking is sized for long sequences) and ~1.4 ms in the six ATen ops of each rotary
// turn; both are a few microseconds of arithmetic. Here every (row, head, query) attends over the keys its mask
// lets it see in one pass (attend.h, fp32 math as the Python path's fp32 SDPA) and writes its output straight into
// [B, S, H * D], the layout the projection reads; the rotary turn is one vector pass with the Python path's rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "attend.h"
#include "linear.h"
#include "simd.h"

namespace {

using glmkit::attend::attend_head_any;
using glmkit::attend::MAX_HEAD_SIZE;
using glmkit::attend::rotate;

template <typename CT>
void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), T = k.size(2);
  const float* qp = q.data_ptr<float>();
  const CT* kp = k.data_ptr<CT>();
  const CT* vp = v.data_ptr<CT>();
  const bool* mp = mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t mh = mask && mask->size(1) > 1 ? mask->stride(1) : 0;
  const bool bf16_out = y.scalar_type() == at::kBFloat16;
  char* yp = static_cast<char*>(y.data_ptr());
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H * S, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(T);
    float out[MAX_HEAD_SIZE];
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / (H * S), h = i / S % H, t = i % S;
      const float* qr = qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
      const CT* K = kp + b * k.stride(0) + h * k.stride(1);
      const CT* V = vp + b * v.stride(0) + h * v.stride(1);
      const bool* vis = mp ? mp + b * mask->stride(0) + h * mh + t * mask->stride(2) : nullptr;
      attend_head_any<CT, false>(qr, K, V, vis, T, D, scale, s.data(), out);
      const int64_t o = (b * S + t) * H * D + h * D;
      if (bf16_out) {
        auto* yo = reinterpret_cast<c10::BFloat16*>(yp) + o;
        for (int64_t d = 0; d < D; d++) yo[d] = c10::BFloat16(out[d]);
      } else {
        std::copy(out, out + D, reinterpret_cast<float*>(yp) + o);
      }
    }
  });
}

}  // namespace

namespace glmkit {

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& mask, bool bf16_out) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 4 && q.stride(3) == 1,
              "attention: q must be a float32 CPU tensor [B, H, S, D] with contiguous heads");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  TORCH_CHECK(D <= MAX_HEAD_SIZE, "attention: head size above ", MAX_HEAD_SIZE);
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(3) == D && t->size(2) == k.size(2) &&
                    t->stride(3) == 1 && t->stride(2) == D && t->scalar_type() == k.scalar_type() &&
                    (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16),
                "attention: k and v must be float32 or bf16 [B, H, T, D] like q, each head's keys contiguous");
  const int64_t T = k.size(2);
  TORCH_CHECK(T > 0, "attention: no keys");
  if (mask)
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(0) == B &&
                    (mask->size(1) == 1 || mask->size(1) == H) && mask->size(2) == S && mask->size(3) == T &&
                    mask->stride(3) == 1,
                "attention: mask must be bool [B, 1 or H, S, T] with contiguous rows");
  auto y = at::empty({B, S, H * D}, q.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (k.scalar_type() == at::kFloat)
    attend_all<float>(q, k, v, mask, y);
  else
    attend_all<c10::BFloat16>(q, k, v, mask, y);
  return y;
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 && x.stride(3) == 1 &&
                  x.size(3) % 2 == 0,
              "rotary: x must be a float32 CPU tensor [B, H, S, D] with contiguous heads and an even D");
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3);
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) == B &&
                    t->size(1) == 1 && t->size(2) == S && t->size(3) == D / 2,
                "rotary: cos and sin must be contiguous float32 [B, 1, S, D / 2]");
  auto out = at::empty({B, H, S, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H * S, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / (H * S), h = i / S % H, t = i % S;
      const int64_t r = (b * S + t) * (D / 2);
      rotate(xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2), cp + r, sp + r, D, op + i * D);
    }
  });
  return out;
}

}  // namespace glmkit
