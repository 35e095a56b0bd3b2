// Causal attention of a step's prefill chunks, read in place from the paged KV cache, for CPU.
//
// A chunk is one sequence's run of n query tokens at positions [L - n, L), where L is its context
// length; query i attends every key at or before its position. The step has written the chunk's
// own keys and values to the cache already, so a chunk that starts a prompt and one that
// continues a cached prefix are the same case. Replaces one scaled_dot_product_attention per
// chunk (with a gather of the cached blocks and a mask when the chunk continues a prefix).
//
// Work items are (chunk, kv head, tile of 16 query positions); the rows of an item are those
// positions times the heads of the kv head's GQA group, so each key and value loaded serves the
// whole group. Keys are first transposed, 64 at a time, into [dim][64] panels: a score update is
// then a broadcast query element times vectors of 64 keys' elements (no horizontal sums), and
// the online softmax (flash attention) keeps each row's running max, sum and output. Items run
// on OpenMP's dynamic schedule, costliest first (causal tiles late in a chunk read more keys).
//
// Built once per host by library.py, registered as torch.ops.deepserve_flowserve.paged_prefill.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "scalar_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

using deepserve_kernels::fast_exp16;
using deepserve_kernels::load16;
using deepserve_kernels::store16;

constexpr int64_t kTile = 16;  // query positions per work item
constexpr int kKeys = 64;      // keys per panel
constexpr int kKeyVecs = kKeys / 16;

struct Shape {
  int64_t heads, kv_heads, group, block_size, max_blocks;
  int64_t block_stride, token_stride, head_stride;  // cache, in elements
  int64_t q_token_stride, q_head_stride, out_token_stride;
};

struct Chunk {
  int64_t q_start, n, context_len;
  const int64_t* table;
};

template <typename T>
inline const T* cache_row(const T* cache, const Shape& s, const Chunk& c, int64_t kv_head,
                          int64_t pos) {
  return cache + c.table[pos / s.block_size] * s.block_stride +
         (pos % s.block_size) * s.token_stride + kv_head * s.head_stride;
}

// Keys [0, keys) of one (chunk, kv head) as float panels [keys / 64][DIM][64], zero past the end.
template <typename T, int DIM>
void transpose_keys(const T* k_cache, const Shape& s, const Chunk& c, int64_t kv_head,
                    int64_t keys, float* panels) {
  const int64_t num_panels = (keys + kKeys - 1) / kKeys;
  for (int64_t p = 0; p < num_panels; ++p) {
    float* panel = panels + p * DIM * kKeys;
    for (int k = 0; k < kKeys; ++k) {
      const int64_t pos = p * kKeys + k;
      if (pos < keys) {
        const T* row = cache_row(k_cache, s, c, kv_head, pos);
        for (int d = 0; d < DIM; ++d) panel[d * kKeys + k] = deepserve_kernels::to_float(row[d]);
      } else {
        for (int d = 0; d < DIM; ++d) panel[d * kKeys + k] = 0.f;
      }
    }
  }
}

// R rows at a time: their scores against one panel of 64 keys (4R accumulators), then their
// outputs updated with the panel's 64 values (R * DIM / 16 accumulators).
template <typename T, int DIM, int R>
void attend_panel(const float* q, const int64_t* row_pos, const float* panel, const T* const* v_rows,
                  int64_t panel_start, float* m, float* l, float* acc) {
  constexpr int V = DIM / 16;
  // The accumulators live in registers through the dim loop and are stored once after it (gcc
  // kept an array indexed later by row in memory, storing all of it on every step).
  alignas(64) float scores[R][kKeys];
  {
    __m512 acc_s[R][kKeyVecs];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int h = 0; h < kKeyVecs; ++h) acc_s[r][h] = _mm512_setzero_ps();
    for (int d = 0; d < DIM; ++d) {
      __m512 k[kKeyVecs];
#pragma GCC unroll 4
      for (int h = 0; h < kKeyVecs; ++h) k[h] = _mm512_loadu_ps(panel + d * kKeys + 16 * h);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 qd = _mm512_set1_ps(q[r * DIM + d]);
#pragma GCC unroll 4
        for (int h = 0; h < kKeyVecs; ++h) acc_s[r][h] = _mm512_fmadd_ps(qd, k[h], acc_s[r][h]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int h = 0; h < kKeyVecs; ++h) _mm512_store_ps(scores[r] + 16 * h, acc_s[r][h]);
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) float p[R][kKeys];
  // Rows unrolled: their reductions and exps are independent chains the core can overlap.
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    // Causal: a key after the row's position (or past the context) scores -inf, and its p is
    // then ~0 (fast_exp16 clamps). Key 0 is in every row's past, so after the first panel the
    // running max is finite and a panel wholly in a row's future leaves the row as it was.
    __m512 sr[kKeyVecs];
    __m512 top = minus_inf;
#pragma GCC unroll 4
    for (int h = 0; h < kKeyVecs; ++h) {
      const __m512i key_pos = _mm512_add_epi32(
          lane, _mm512_set1_epi32(static_cast<int32_t>(panel_start + 16 * h)));
      const __mmask16 seen = _mm512_cmple_epi32_mask(
          key_pos, _mm512_set1_epi32(static_cast<int32_t>(row_pos[r])));
      sr[h] = _mm512_mask_blend_ps(seen, minus_inf, _mm512_load_ps(scores[r] + 16 * h));
      top = _mm512_max_ps(top, sr[h]);
    }
    const float m_new = std::max(m[r], _mm512_reduce_max_ps(top));
    const float alpha = deepserve_kernels::fast_exp(m[r] - m_new);
    const __m512 shift = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int h = 0; h < kKeyVecs; ++h) {
      const __m512 ph = fast_exp16(_mm512_sub_ps(sr[h], shift));
      _mm512_store_ps(p[r] + 16 * h, ph);
      sum = _mm512_add_ps(sum, ph);
    }
    l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
    m[r] = m_new;
    const __m512 a = _mm512_set1_ps(alpha);
    for (int v = 0; v < V; ++v) {
      _mm512_storeu_ps(acc + r * DIM + 16 * v,
                       _mm512_mul_ps(a, _mm512_loadu_ps(acc + r * DIM + 16 * v)));
    }
  }
  __m512 o[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) o[r][v] = _mm512_loadu_ps(acc + r * DIM + 16 * v);
  for (int k = 0; k < kKeys; ++k) {
    __m512 val[V];
    for (int v = 0; v < V; ++v) val[v] = load16(v_rows[k] + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(p[r][k]);
      for (int v = 0; v < V; ++v) o[r][v] = _mm512_fmadd_ps(w, val[v], o[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + r * DIM + 16 * v, o[r][v]);
}

// One work item: positions [i0, i1) of the chunk (query indices), all heads of one kv head.
template <typename T, int DIM>
void attend_tile(const T* q_data, const T* v_cache, const Shape& s, const Chunk& c,
                 int64_t kv_head, int64_t i0, int64_t i1, float scale, const float* panels,
                 T* out_data) {
  constexpr int R = DIM <= 64 ? 4 : 2;
  const int64_t rows = (i1 - i0) * s.group;
  const int64_t padded = (rows + R - 1) / R * R;
  std::vector<float> q(padded * DIM, 0.f), acc(padded * DIM, 0.f), l(padded, 0.f);
  std::vector<float> m(padded, -std::numeric_limits<float>::infinity());
  // A padding row sees every key (its output is dropped): no row is ever wholly masked.
  std::vector<int64_t> row_pos(padded, std::numeric_limits<int32_t>::max());
  const int64_t first_pos = c.context_len - c.n;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / s.group;
    const int64_t head = kv_head * s.group + r % s.group;
    const T* q_row = q_data + (c.q_start + i) * s.q_token_stride + head * s.q_head_stride;
    for (int d = 0; d < DIM; ++d) q[r * DIM + d] = deepserve_kernels::to_float(q_row[d]) * scale;
    row_pos[r] = first_pos + i;
  }
  const int64_t keys = first_pos + i1;  // the last row sees keys [0, keys)
  const T* v_rows[kKeys];
  const T zeros[DIM] = {};  // the values past the context (their p is ~0)
  for (int64_t start = 0; start < keys; start += kKeys) {
    for (int k = 0; k < kKeys; ++k) {
      v_rows[k] = start + k < keys ? cache_row(v_cache, s, c, kv_head, start + k) : zeros;
    }
    const float* panel = panels + (start / kKeys) * DIM * kKeys;
    for (int64_t r = 0; r < padded; r += R) {
      attend_panel<T, DIM, R>(q.data() + r * DIM, row_pos.data() + r, panel, v_rows, start,
                              m.data() + r, l.data() + r, acc.data() + r * DIM);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / s.group;
    const int64_t head = kv_head * s.group + r % s.group;
    T* out = out_data + (c.q_start + i) * s.out_token_stride + head * DIM;
    const __m512 norm = _mm512_set1_ps(1.f / l[r]);
    for (int v = 0; v < DIM / 16; ++v) {
      store16(out + 16 * v, _mm512_mul_ps(norm, _mm512_loadu_ps(acc.data() + r * DIM + 16 * v)));
    }
  }
}

template <typename T, int DIM>
void prefill_impl(const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                  const at::Tensor& query_starts, const at::Tensor& query_lens,
                  const at::Tensor& context_lens, double scale, at::Tensor& out) {
  Shape s;
  s.heads = query.size(1);
  s.kv_heads = key_cache.size(2);
  s.group = s.heads / s.kv_heads;
  s.block_size = key_cache.size(1);
  s.max_blocks = block_tables.size(1);
  s.block_stride = key_cache.stride(0);
  s.token_stride = key_cache.stride(1);
  s.head_stride = key_cache.stride(2);
  s.q_token_stride = query.stride(0);
  s.q_head_stride = query.stride(1);
  s.out_token_stride = out.stride(0);
  const int64_t num_chunks = block_tables.size(0);
  std::vector<Chunk> chunks(num_chunks);
  // Each chunk's panels start here (floats), one run per kv head of head_panel_floats[chunk].
  std::vector<int64_t> panel_offset(num_chunks + 1, 0), head_panel_floats(num_chunks);
  for (int64_t i = 0; i < num_chunks; ++i) {
    chunks[i] = {query_starts.data_ptr<int64_t>()[i], query_lens.data_ptr<int64_t>()[i],
                 context_lens.data_ptr<int64_t>()[i],
                 block_tables.data_ptr<int64_t>() + i * s.max_blocks};
    head_panel_floats[i] = (chunks[i].context_len + kKeys - 1) / kKeys * DIM * kKeys;
    panel_offset[i + 1] = panel_offset[i] + s.kv_heads * head_panel_floats[i];
  }
  // Every float is written by transpose_keys (zeros past a context): no initialisation.
  const std::unique_ptr<float[]> panels(new float[panel_offset[num_chunks]]);
  auto head_panels = [&](int64_t chunk, int64_t kv_head) {
    return panels.get() + panel_offset[chunk] + kv_head * head_panel_floats[chunk];
  };
  const T* q_data = query.data_ptr<T>();
  const T* k_cache = key_cache.data_ptr<T>();
  const T* v_cache = value_cache.data_ptr<T>();
  T* out_data = out.data_ptr<T>();

  // Items: (chunk, kv head, tile), costliest (most keys) first for the dynamic schedule.
  struct Item {
    int64_t chunk, kv_head, i0, i1, keys;
  };
  std::vector<Item> items;
  for (int64_t ci = 0; ci < num_chunks; ++ci) {
    const Chunk& c = chunks[ci];
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      for (int64_t i0 = 0; i0 < c.n; i0 += kTile) {
        const int64_t i1 = std::min(c.n, i0 + kTile);
        items.push_back({ci, h, i0, i1, c.context_len - c.n + i1});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.keys > b.keys; });
  const int64_t heads_items = num_chunks * s.kv_heads;
  const float softmax_scale = static_cast<float>(scale);
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < heads_items; ++item) {
      const int64_t ci = item / s.kv_heads, h = item % s.kv_heads;
      transpose_keys<T, DIM>(k_cache, s, chunks[ci], h, chunks[ci].context_len, head_panels(ci, h));
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < static_cast<int64_t>(items.size()); ++index) {
      const Item& it = items[index];
      attend_tile<T, DIM>(q_data, v_cache, s, chunks[it.chunk], it.kv_head, it.i0, it.i1,
                          softmax_scale, head_panels(it.chunk, it.kv_head), out_data);
    }
  }
}

template <typename T>
void prefill_dispatch(int64_t dim, const at::Tensor& query, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor& block_tables,
                      const at::Tensor& query_starts, const at::Tensor& query_lens,
                      const at::Tensor& context_lens, double scale, at::Tensor& out) {
  if (dim == 64) {
    prefill_impl<T, 64>(query, key_cache, value_cache, block_tables, query_starts, query_lens,
                        context_lens, scale, out);
  } else if (dim == 128) {
    prefill_impl<T, 128>(query, key_cache, value_cache, block_tables, query_starts, query_lens,
                         context_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_prefill serves head sizes 64 and 128, not ", dim);
  }
}

// query [tokens, heads, dim] (rows may be strided); caches [blocks, block_size, kv_heads, dim];
// block_tables [chunks, max_blocks] int64; query_starts, query_lens, context_lens [chunks] int64;
// out [tokens, heads * dim] (rows may be strided): the chunks' rows are written, no others.
void paged_prefill(const at::Tensor& query, const at::Tensor& key_cache,
                   const at::Tensor& value_cache, const at::Tensor& block_tables,
                   const at::Tensor& query_starts, const at::Tensor& query_lens,
                   const at::Tensor& context_lens, double scale, at::Tensor out) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4 && out.dim() == 2, "query 3-D, caches 4-D, out 2-D");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes() && key_cache.strides() == value_cache.strides(),
              "key and value caches differ");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() &&
                  value_cache.scalar_type() == key_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, caches and out must share a dtype");
  TORCH_CHECK(query.stride(2) == 1 && key_cache.stride(3) == 1 && out.stride(1) == 1,
              "head_dim must be contiguous");
  TORCH_CHECK(query.size(2) == key_cache.size(3), "head_dim differs");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "heads not a multiple of kv heads");
  TORCH_CHECK(out.size(0) == query.size(0) && out.size(1) == query.size(1) * query.size(2),
              "out must be [tokens, heads * head_dim]");
  const int64_t chunks = block_tables.size(0);
  for (const at::Tensor* t : {&query_starts, &query_lens, &context_lens}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == chunks,
                "query_starts, query_lens and context_lens must be contiguous int64 [chunks]");
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.dim() == 2,
              "block_tables must be contiguous int64 [chunks, max_blocks]");
  const int64_t* starts = query_starts.data_ptr<int64_t>();
  const int64_t* lens = query_lens.data_ptr<int64_t>();
  const int64_t* contexts = context_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < chunks; ++i) {
    TORCH_CHECK(lens[i] >= 1 && contexts[i] >= lens[i] && starts[i] >= 0 &&
                    starts[i] + lens[i] <= query.size(0),
                "chunk ", i, ": queries outside the step or longer than its context");
    TORCH_CHECK((contexts[i] + key_cache.size(1) - 1) / key_cache.size(1) <= block_tables.size(1),
                "chunk ", i, ": the block table is shorter than its context");
  }
  const int64_t dim = query.size(2);
  if (query.scalar_type() == at::kFloat) {
    prefill_dispatch<float>(dim, query, key_cache, value_cache, block_tables, query_starts,
                            query_lens, context_lens, scale, out);
  } else if (query.scalar_type() == at::kBFloat16) {
    prefill_dispatch<c10::BFloat16>(dim, query, key_cache, value_cache, block_tables,
                                    query_starts, query_lens, context_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_prefill supports float32 and bfloat16, not ", query.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepserve_flowserve, m) {
  m.def(
      "paged_prefill(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor query_starts, Tensor query_lens, Tensor context_lens, float scale, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(deepserve_flowserve, CPU, m) { m.impl("paged_prefill", &paged_prefill); }

#endif  // __AVX512F__
