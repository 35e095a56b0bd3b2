// The elementwise parts of a decoder layer, fused, for CPU: RMSNorm (optionally after the
// residual add), SiLU-and-multiply, rotary embedding in place, and the store of a step's keys
// and values into the paged cache.
//
// In eager torch each is several kernels, each a pass over memory, and in bfloat16 each converts
// to float and back: they took 30% of a bfloat16 prefill step (bench/RESULTS.md, issue #19).
// Here each is one pass with float arithmetic, rounding to the tensor's dtype where the reference
// (transformers' Llama) rounds.
//
// Built with the other kernels into one library (library.py); registered under
// torch.ops.deepserve_flowserve.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "layer_kernels.h"
#include "scalar_math.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using deepserve_kernels::fast_exp;
using deepserve_kernels::from_float;
using deepserve_kernels::to_float;

// Rows per task: enough work to pay for a thread's wake-up at small hidden sizes.
constexpr int64_t kGrainRows = 16;

template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, const T* weight, T* out, int64_t out_stride,
                   int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * x_stride;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = to_float(row[i]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
      T* o = out + r * out_stride;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) {
        // transformers rounds the normalised row to the dtype, then scales by the weight.
        const T normed = from_float<T>(to_float(row[i]) * inv);
        o[i] = from_float<T>(to_float(weight[i]) * to_float(normed));
      }
    }
  });
}

template <typename F>
void by_dtype(const at::Tensor& x, const char* op, F&& body) {
  if (x.scalar_type() == at::kFloat) {
    body(float{});
  } else if (x.scalar_type() == at::kBFloat16) {
    body(c10::BFloat16{});
  } else {
    TORCH_CHECK(false, op, " supports float32 and bfloat16, not ", x.scalar_type());
  }
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D with contiguous rows");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "weight must be a contiguous [hidden] tensor");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
}

}  // namespace

namespace deepserve_kernels {

// RMSNorm of x [tokens, hidden] -> new [tokens, hidden].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  by_dtype(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(x.data_ptr<T>(), x.stride(0), weight.data_ptr<T>(), out.data_ptr<T>(),
                     out.stride(0), x.size(0), x.size(1), static_cast<float>(eps));
  });
  return out;
}

// residual += x (in place, rounded to the dtype), then RMSNorm of the new residual -> new tensor.
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                        double eps) {
  check_norm(residual, weight);
  TORCH_CHECK(x.sizes() == residual.sizes() && x.stride(1) == 1 &&
                  x.scalar_type() == residual.scalar_type(),
              "x must match the residual's shape and dtype");
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  by_dtype(x, "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    T* res = residual.data_ptr<T>();
    const T* add = x.data_ptr<T>();
    const int64_t hidden = x.size(1);
    const int64_t res_stride = residual.stride(0);
    const int64_t x_stride = x.stride(0);
    at::parallel_for(0, x.size(0), kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* row = res + r * res_stride;
        const T* other = add + r * x_stride;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) {
          row[i] = from_float<T>(to_float(row[i]) + to_float(other[i]));
        }
      }
    });
    rms_norm_rows<T>(res, res_stride, weight.data_ptr<T>(), out.data_ptr<T>(), out.stride(0),
                     x.size(0), hidden, static_cast<float>(eps));
  });
  return out;
}

// gate_up [tokens, 2 * inter] (gate, then up) -> silu(gate) * up, [tokens, inter].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be 2-D [tokens, 2 * intermediate] with contiguous rows");
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), inter}, gate_up.options());
  by_dtype(gate_up, "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* in = gate_up.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const int64_t stride = gate_up.stride(0);
    at::parallel_for(0, gate_up.size(0), kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* gate = in + r * stride;
        const T* up = gate + inter;
        T* row = o + r * inter;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= inter; i += 16) {
          const __m512 g = deepserve_kernels::load16(gate + i);
          const __m512 silu = _mm512_div_ps(
              g, _mm512_add_ps(_mm512_set1_ps(1.f),
                               deepserve_kernels::fast_exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
          // transformers rounds silu(gate) to the dtype before the product.
          const __m512 act = deepserve_kernels::round16(T{}, silu);
          deepserve_kernels::store16(row + i, _mm512_mul_ps(act, deepserve_kernels::load16(up + i)));
        }
#endif
        for (; i < inter; ++i) {
          const float g = to_float(gate[i]);
          const T act = from_float<T>(g / (1.f + fast_exp(-g)));
          row[i] = from_float<T>(to_float(act) * to_float(up[i]));
        }
      }
    });
  });
  return out;
}

// Rotate x [tokens, heads, head_dim] in place (rotate-half layout): for each half-pair,
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). cos and sin are [positions, head_dim / 2] in
// float32; positions [tokens] int64 picks each token's row.
void rotary_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
             const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [tokens, heads, head_dim]");
  const int64_t half = x.size(2) / 2;
  TORCH_CHECK(x.size(2) % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes() && cos.size(1) == half,
              "cos and sin must be contiguous float32 [positions, head_dim / 2]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == x.size(0),
              "positions must be contiguous int64 [tokens]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t table_len = cos.size(0);
  for (int64_t t = 0; t < x.size(0); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < table_len, "position ", pos[t], " outside the table");
  }
  by_dtype(x, "rotary_", [&](auto tag) {
    using T = decltype(tag);
    T* data = x.data_ptr<T>();
    const float* cos_data = cos.data_ptr<float>();
    const float* sin_data = sin.data_ptr<float>();
    const int64_t heads = x.size(1);
    const int64_t token_stride = x.stride(0);
    const int64_t head_stride = x.stride(1);
    at::parallel_for(0, x.size(0), kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* c = cos_data + pos[t] * half;
        const float* s = sin_data + pos[t] * half;
        for (int64_t h = 0; h < heads; ++h) {
          T* x1 = data + t * token_stride + h * head_stride;
          T* x2 = x1 + half;
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float a = to_float(x1[i]);
            const float b = to_float(x2[i]);
            x1[i] = from_float<T>(a * c[i] - b * s[i]);
            x2[i] = from_float<T>(b * c[i] + a * s[i]);
          }
        }
      }
    });
  });
}

// Store key and value [tokens, kv_heads, head_dim] (each token's heads contiguous, as the
// slices of a fused qkv output are) at flat slots of one layer's paged cache [blocks,
// block_size, kv_heads, head_dim]: one memcpy per token and tensor. index_copy_ walked these
// slices element by element (0.8-1.3 ms a layer for a 2048-token step, 1.6-1.9% of it).
void write_kv_(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slots,
               const at::Tensor& key, const at::Tensor& value) {
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes(),
              "the caches must be contiguous [blocks, block_size, kv_heads, head_dim], alike");
  const int64_t kv_heads = key_cache.size(2), head_dim = key_cache.size(3);
  const int64_t row = kv_heads * head_dim;
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  for (const at::Tensor* t : {&key, &value}) {
    TORCH_CHECK(t->dim() == 3 && t->size(1) == kv_heads && t->size(2) == head_dim &&
                    t->stride(2) == 1 && t->stride(1) == head_dim,
                "key and value must be [tokens, kv_heads, head_dim], each token's heads contiguous");
    TORCH_CHECK(t->scalar_type() == key_cache.scalar_type(), "key and value must be the cache's dtype");
    TORCH_CHECK(t->size(0) == slots.numel(), "one slot per token");
  }
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous(),
              "slots must be contiguous int64 [tokens]");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t tokens = slots.numel();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " outside the cache");
  }
  const int64_t bytes = row * static_cast<int64_t>(key_cache.element_size());
  char* kc = static_cast<char*>(key_cache.data_ptr());
  char* vc = static_cast<char*>(value_cache.data_ptr());
  const char* k = static_cast<const char*>(key.data_ptr());
  const char* v = static_cast<const char*>(value.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size();
  const int64_t v_stride = value.stride(0) * value.element_size();
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + slot[t] * bytes, k + t * k_stride, bytes);
      std::memcpy(vc + slot[t] * bytes, v + t * v_stride, bytes);
    }
  });
}

}  // namespace deepserve_kernels

TORCH_LIBRARY_FRAGMENT(deepserve_flowserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin) -> ()");
  m.def(
      "write_kv_(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slots, Tensor key, "
      "Tensor value) -> ()");
}

TORCH_LIBRARY_IMPL(deepserve_flowserve, CPU, m) {
  m.impl("rms_norm", &deepserve_kernels::rms_norm);
  m.impl("add_rms_norm", &deepserve_kernels::add_rms_norm);
  m.impl("silu_mul", &deepserve_kernels::silu_mul);
  m.impl("rotary_", &deepserve_kernels::rotary_);
  m.impl("write_kv_", &deepserve_kernels::write_kv_);
}
