// The weight-only linear ops of linear.cpp, for the other C++ files of glmkit.kernels (decode.cpp).
#pragma once
#include <ATen/ATen.h>

namespace glmkit {

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias);
at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group_size,
                       const c10::optional<at::Tensor>& bias);
at::Tensor decode_blocks(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef linear_meta,
                         at::Tensor k_cache, at::Tensor v_cache, at::IntArrayRef slots, at::IntArrayRef lengths,
                         int64_t n_head, double eps, c10::string_view gelu);

}  // namespace glmkit
