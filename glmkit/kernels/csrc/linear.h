// The weight-only linear ops of linear.cpp, for the other C++ files of glmkit.kernels (decode.cpp).
#pragma once
#include <ATen/ATen.h>

namespace glmkit {

// bf16 activations of more rows go to oneDNN's GEMM (at::linear): same rounding (bf16 in, fp32 sums); the tiled
// kernel is 10-30 % faster from 8 to 56 rows on this project's CPU and even at 64 (benchmarks/RESULTS.md).
constexpr int64_t BF16_GEMV_MAX_ROWS = 56;

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias);
at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group_size,
                       const c10::optional<at::Tensor>& bias);
at::Tensor linear_int4x16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group_size,
                          const c10::optional<at::Tensor>& bias);
at::Tensor gelu_tanh_bf16(const at::Tensor& x);
at::Tensor norm_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, double eps);
at::Tensor pack_bf16(const at::Tensor& w);
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& mask, bool bf16_out);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor linear_packed_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                              const c10::optional<at::Tensor>& bias);
at::Tensor decode_blocks(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef linear_meta,
                         at::Tensor k_cache, at::Tensor v_cache, at::IntArrayRef slots, at::IntArrayRef lengths,
                         const c10::optional<at::Tensor>& rope, int64_t n_head, double eps,
                         c10::string_view activation, bool qkv_per_head, int64_t rope_halves,
                         double residual_alpha);

}  // namespace glmkit
