// Every decoder layer of a decode step in one call, for CPU.
//
// A decode step's layer is ten small kernels (norm, qkv, rotary, KV store, attention, o, norm,
// gate_up, SiLU, down). At batch 1 on SmolLM2 each lasts tens of microseconds, and crossing from
// Python into torch's dispatcher for each, 300 times a step, cost ~3 ms of a ~28 ms step on a
// 2-core Zen 3 (bench/RESULTS.md, issue #19). Here the same kernels run back to back in C++,
// so the step leaves Python once and releases the interpreter's lock for all of it.
//
// The arithmetic is the kernels' own (layer_kernels.h), in the order the Python layer loop calls
// them, so the results are the same bits.
//
// Built with the other kernels into one library (library.py); registered under
// torch.ops.deepserve_flowserve.

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "layer_kernels.h"

#include <cstdint>
#include <optional>

namespace {

// Each layer's tensors in `weights`, in this order.
enum Weight : int64_t { kInputNorm, kQkv, kO, kPostNorm, kGateUp, kDown, kWeightsPerLayer };
// Each layer's optional biases in `biases`, in this order.
enum Bias : int64_t { kQkvBias, kOBias, kGateUpBias, kDownBias, kBiasesPerLayer };

// residual [rows, hidden]: the embedded tokens, one per sequence (added to in place).
// weights: per layer input_norm, qkv/o/gate_up/down skinny panels, post_norm.
// biases: per layer the four projections' biases or None.
// kv_caches: per layer its key cache, then its value cache.
// positions, slots: [rows] int64; block_tables [rows, max_blocks] and context_lens [rows] int64
// as for paged_decode; cos and sin the rotary tables, as for rotary_.
// Returns the hidden states after the last layer, [rows, hidden] (the final norm not applied).
at::Tensor decode_layers(at::Tensor& residual, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases,
                         at::TensorList kv_caches, const at::Tensor& positions,
                         const at::Tensor& slots, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, const at::Tensor& cos,
                         const at::Tensor& sin, int64_t heads, int64_t kv_heads,
                         int64_t intermediate, double eps, double scale) {
  const int64_t layers = static_cast<int64_t>(kv_caches.size()) / 2;
  TORCH_CHECK(static_cast<int64_t>(kv_caches.size()) == 2 * layers && layers > 0,
              "kv_caches must hold a key and a value cache per layer");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kWeightsPerLayer * layers,
              "weights must hold ", kWeightsPerLayer, " tensors per layer");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == kBiasesPerLayer * layers,
              "biases must hold ", kBiasesPerLayer, " entries per layer");
  TORCH_CHECK(residual.dim() == 2 && residual.is_contiguous(), "residual must be contiguous 2-D");
  const int64_t rows = residual.size(0);
  const int64_t hidden = residual.size(1);
  const int64_t head_dim = kv_caches[0].size(3);
  const int64_t q_size = heads * head_dim;
  const int64_t kv_size = kv_heads * head_dim;
  const int64_t qkv_size = q_size + 2 * kv_size;

  at::Tensor pending;  // the last sublayer's output, added into the residual by the next norm
  for (int64_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* w = weights.data() + layer * kWeightsPerLayer;
    const auto bias = [&](Bias which) -> std::optional<at::Tensor> {
      return biases.get(layer * kBiasesPerLayer + which);
    };
    at::Tensor key_cache = kv_caches[2 * layer];
    at::Tensor value_cache = kv_caches[2 * layer + 1];

    at::Tensor x = pending.defined()
                       ? deepserve_kernels::add_rms_norm(residual, pending, w[kInputNorm], eps)
                       : deepserve_kernels::rms_norm(residual, w[kInputNorm], eps);
    at::Tensor qkv = deepserve_kernels::skinny_linear(x, w[kQkv], qkv_size, bias(kQkvBias));
    // q and k heads rotate together, in place in qkv.
    at::Tensor qk = qkv.narrow(1, 0, q_size + kv_size).view({rows, heads + kv_heads, head_dim});
    deepserve_kernels::rotary_(qk, positions, cos, sin);
    const at::Tensor key = qk.narrow(1, heads, kv_heads);
    const at::Tensor value = qkv.narrow(1, q_size + kv_size, kv_size).view({rows, kv_heads, head_dim});
    deepserve_kernels::write_kv_(key_cache, value_cache, slots, key, value);
    const at::Tensor attn = deepserve_kernels::paged_decode(
        qk.narrow(1, 0, heads), key_cache, value_cache, block_tables, context_lens, scale);
    const at::Tensor attn_out =
        deepserve_kernels::skinny_linear(attn.view({rows, q_size}), w[kO], hidden, bias(kOBias));

    x = deepserve_kernels::add_rms_norm(residual, attn_out, w[kPostNorm], eps);
    const at::Tensor gate_up =
        deepserve_kernels::skinny_linear(x, w[kGateUp], 2 * intermediate, bias(kGateUpBias));
    const at::Tensor act = deepserve_kernels::silu_mul(gate_up);
    pending = deepserve_kernels::skinny_linear(act, w[kDown], hidden, bias(kDownBias));
  }
  return at::add(residual, pending);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepserve_flowserve, m) {
  m.def(
      "decode_layers(Tensor(a!) residual, Tensor[] weights, Tensor?[] biases, Tensor[] kv_caches, "
      "Tensor positions, Tensor slots, Tensor block_tables, Tensor context_lens, Tensor cos, "
      "Tensor sin, int heads, int kv_heads, int intermediate, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(deepserve_flowserve, CPU, m) { m.impl("decode_layers", &decode_layers); }
