// The kernels of one decoder layer, callable from C++ across the library's sources.
//
// Each is also a torch op (registered where it is defined); decode_layers.cpp chains them in one
// call per step, so a decode step crosses from Python into the library once instead of ~10 times
// a layer.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace deepserve_kernels {

// fused_layer_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                        double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
void rotary_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
             const at::Tensor& sin);
void write_kv_(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slots,
               const at::Tensor& key, const at::Tensor& value);

// paged_decode.cpp
at::Tensor paged_decode(const at::Tensor& query, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& block_tables,
                        const at::Tensor& context_lens, double scale);

// skinny_linear.cpp
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const c10::optional<at::Tensor>& bias);

}  // namespace deepserve_kernels
