// One token per row of a step's logits, for CPU: the argmax (greedy rows), or a draw from
// softmax(logits / temperature) by inverting the row's CDF at one uniform (sampled rows).
//
// The torch version of the draw makes a float32 copy of the logits, divides it, takes the row
// max, exponentiates, runs a cumsum and a search: six passes over [rows, vocab] and two full-size
// temporaries, 9.5 ms for 32 rows of a 49k vocabulary on this project's 2-core host, while the
// next decode step waits for the tokens (bench/RESULTS.md, issue #19). Here a row is read three
// times: its max; its weights exp((x - max) / T), summed per 16-lane block (a block sum per 16
// tokens, kept); and only the block where the running sum passes u * total, re-exponentiated.
// Rows run in parallel; the logits are never written.
//
// A weight whose exponent is below -87.3 (or a masked token, -inf) counts as exactly 0, so it is
// never drawn; the search walks the same block sums the total was made of, in order, so u < 1
// always lands on a token of nonzero weight.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "scalar_math.h"

namespace {

using deepserve_kernels::fast_exp;

constexpr float kExpFloor = -87.3f;  // fast_exp's clamp: anything lower weighs 0

inline float weight_of(float x, float max, float inv_temperature) {
  const float exponent = (x - max) * inv_temperature;
  return exponent < kExpFloor ? 0.0f : fast_exp(exponent);
}

// The weights of tokens [16 b, 16 b + 16) of the row into out[16] (0 past the vocabulary).
inline void block_weights(const float* x, int64_t vocab, int64_t b, float max,
                          float inv_temperature, float* out) {
  const int64_t begin = b * 16, count = std::min<int64_t>(16, vocab - begin);
#if defined(__AVX512F__)
  const __mmask16 lanes = count >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << count) - 1);
  const __m512 vmax = _mm512_set1_ps(max);
  // Absent lanes load the max (exponent 0) and are zeroed with the floored ones below.
  const __m512 values = _mm512_mask_loadu_ps(vmax, lanes, x + begin);
  const __m512 exponent =
      _mm512_mul_ps(_mm512_sub_ps(values, vmax), _mm512_set1_ps(inv_temperature));
  const __mmask16 live =
      lanes & _mm512_cmp_ps_mask(exponent, _mm512_set1_ps(kExpFloor), _CMP_GE_OQ);
  _mm512_storeu_ps(out, _mm512_maskz_mov_ps(live, deepserve_kernels::fast_exp16(exponent)));
#else
  for (int64_t i = 0; i < 16; ++i) {
    out[i] = i < count ? weight_of(x[begin + i], max, inv_temperature) : 0.0f;
  }
#endif
}

// The first index of the row's largest value (torch.argmax's tie rule); 0 if none compares.
int64_t first_max(const float* x, int64_t vocab, float* max_out) {
  float max = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(max);
  for (; i + 16 <= vocab; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(x + i));
  max = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < vocab; ++i) max = x[i] > max ? x[i] : max;
  *max_out = max;
  for (int64_t j = 0; j < vocab; ++j) {
    if (x[j] == max) return j;
  }
  return 0;
}

// A draw from softmax(x / T) at `uniform` in [0, 1); -1 if no token weighs anything.
// `block_sums` holds ceil(vocab / 16) floats.
int64_t draw(const float* x, int64_t vocab, float max, float inv_temperature, float uniform,
             float* block_sums) {
  const int64_t blocks = (vocab + 15) / 16;
  alignas(64) float w[16];
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    block_weights(x, vocab, b, max, inv_temperature, w);
#if defined(__AVX512F__)
    const float sum = _mm512_reduce_add_ps(_mm512_load_ps(w));
#else
    float sum = 0.0f;
    for (int i = 0; i < 16; ++i) sum += w[i];
#endif
    block_sums[b] = sum;
    total += sum;
  }
  const double target = static_cast<double>(uniform) * total;
  double running = 0.0;
  int64_t last_block = -1;
  for (int64_t b = 0; b < blocks; ++b) {
    if (block_sums[b] <= 0.0f) continue;
    last_block = b;
    if (running + block_sums[b] > target) break;
    running += block_sums[b];
  }
  if (last_block < 0) return -1;
  // The draw falls in `last_block` (or past every block, when u * total rounded up to the
  // total): walk its tokens; the block's last token of nonzero weight is the fallback.
  block_weights(x, vocab, last_block, max, inv_temperature, w);
  int64_t pick = -1;
  for (int i = 0; i < 16; ++i) {
    if (w[i] <= 0.0f) continue;
    running += w[i];
    pick = last_block * 16 + i;
    if (running > target) break;
  }
  return pick;
}

// logits [rows, vocab] float32; inv_temperature [rows] float32 (<= 0: greedy); uniform [rows]
// float32 in [0, 1) (read for sampled rows only) -> token ids [rows] int64.
at::Tensor sample_tokens(const at::Tensor& logits, const at::Tensor& inv_temperature,
                         const at::Tensor& uniform) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [rows, vocab]");
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "logits must be float32");
  TORCH_CHECK(logits.size(1) > 0, "logits need a vocabulary");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  for (const at::Tensor* t : {&inv_temperature, &uniform}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->scalar_type() == at::kFloat,
                "inv_temperature and uniform must be float32 [rows]");
  }
  const at::Tensor x = logits.contiguous();
  const at::Tensor inv = inv_temperature.contiguous(), u = uniform.contiguous();
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  const float* invp = inv.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  int64_t* outp = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block_sums((vocab + 15) / 16);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * vocab;
      float max = 0.0f;
      const int64_t argmax = first_max(row, vocab, &max);
      const bool greedy = !(invp[r] > 0.0f) || !std::isfinite(max);
      outp[r] = greedy ? argmax : draw(row, vocab, max, invp[r], up[r], block_sums.data());
      if (outp[r] < 0) outp[r] = argmax;  // nothing weighs anything (cannot happen for u < 1)
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepserve_flowserve, m) {
  m.def("sample_tokens(Tensor logits, Tensor inv_temperature, Tensor uniform) -> Tensor");
}

TORCH_LIBRARY_IMPL(deepserve_flowserve, CPU, m) { m.impl("sample_tokens", &sample_tokens); }
