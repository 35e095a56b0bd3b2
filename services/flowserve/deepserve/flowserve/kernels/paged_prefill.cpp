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
// In bfloat16 on hosts with AMX, the keys and values are packed instead into the tiles' operand
// layout, and each 16 positions of one head against 32 keys are two tile products for the scores
// and one per 16 dims for the outputs; the online softmax between them stays in AVX-512.
// The vector path is written on vec16.h's 16-lane rows, so AVX2 hosts run it too.
//
// Built once per host by library.py, registered as torch.ops.deepserve_flowserve.paged_prefill.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "amx_tiles.h"
#include "scalar_math.h"
#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(DEEPSERVE_VEC16)

namespace {

using deepserve_kernels::add16;
using deepserve_kernels::f32x16;
using deepserve_kernels::fast_exp16;
using deepserve_kernels::fmadd16;
using deepserve_kernels::loadu16;
using deepserve_kernels::mask_after16;
using deepserve_kernels::max16;
using deepserve_kernels::mul16;
using deepserve_kernels::reduce_add16;
using deepserve_kernels::reduce_max16;
using deepserve_kernels::set1_16;
using deepserve_kernels::storeu16;
using deepserve_kernels::sub16;
using deepserve_kernels::zero16;
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
    f32x16 acc_s[R][kKeyVecs];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int h = 0; h < kKeyVecs; ++h) acc_s[r][h] = zero16();
    for (int d = 0; d < DIM; ++d) {
      f32x16 k[kKeyVecs];
#pragma GCC unroll 4
      for (int h = 0; h < kKeyVecs; ++h) k[h] = loadu16(panel + d * kKeys + 16 * h);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const f32x16 qd = set1_16(q[r * DIM + d]);
#pragma GCC unroll 4
        for (int h = 0; h < kKeyVecs; ++h) acc_s[r][h] = fmadd16(qd, k[h], acc_s[r][h]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int h = 0; h < kKeyVecs; ++h) storeu16(scores[r] + 16 * h, acc_s[r][h]);
  }
  const f32x16 minus_inf = set1_16(-std::numeric_limits<float>::infinity());
  alignas(64) float p[R][kKeys];
  // Rows unrolled: their reductions and exps are independent chains the core can overlap.
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    // Causal: a key after the row's position (or past the context) scores -inf, and its p is
    // then ~0 (fast_exp16 clamps). Key 0 is in every row's past, so after the first panel the
    // running max is finite and a panel wholly in a row's future leaves the row as it was.
    f32x16 sr[kKeyVecs];
    f32x16 top = minus_inf;
#pragma GCC unroll 4
    for (int h = 0; h < kKeyVecs; ++h) {
      sr[h] = mask_after16(loadu16(scores[r] + 16 * h), static_cast<int32_t>(panel_start + 16 * h),
                           static_cast<int32_t>(row_pos[r]), minus_inf);
      top = max16(top, sr[h]);
    }
    const float m_new = std::max(m[r], reduce_max16(top));
    const float alpha = deepserve_kernels::fast_exp(m[r] - m_new);
    const f32x16 shift = set1_16(m_new);
    f32x16 sum = zero16();
#pragma GCC unroll 4
    for (int h = 0; h < kKeyVecs; ++h) {
      const f32x16 ph = fast_exp16(sub16(sr[h], shift));
      storeu16(p[r] + 16 * h, ph);
      sum = add16(sum, ph);
    }
    l[r] = l[r] * alpha + reduce_add16(sum);
    m[r] = m_new;
    const f32x16 a = set1_16(alpha);
    for (int v = 0; v < V; ++v) {
      storeu16(acc + r * DIM + 16 * v,
                       mul16(a, loadu16(acc + r * DIM + 16 * v)));
    }
  }
  f32x16 o[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) o[r][v] = loadu16(acc + r * DIM + 16 * v);
  for (int k = 0; k < kKeys; ++k) {
    f32x16 val[V];
    for (int v = 0; v < V; ++v) val[v] = load16(v_rows[k] + 16 * v);
    for (int r = 0; r < R; ++r) {
      const f32x16 w = set1_16(p[r][k]);
      for (int v = 0; v < V; ++v) o[r][v] = fmadd16(w, val[v], o[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) storeu16(acc + r * DIM + 16 * v, o[r][v]);
}

// One work item: positions [i0, i1) of the chunk (query indices), all heads of one kv head.
template <typename T, int DIM>
void attend_tile(const T* q_data, const T* v_cache, const Shape& s, const Chunk& c,
                 int64_t kv_head, int64_t i0, int64_t i1, float scale, const float* panels,
                 T* out_data) {
  // Rows per register tile: their score accumulators (4 vectors a row), a panel row of keys and,
  // for the outputs, DIM / 16 vectors a row beside the values must fit the vector registers.
  // AVX2's 16 ymm take one row (2 spilled, 1.04-1.08x the time).
  constexpr int R = deepserve_kernels::kVecRegs == 32 ? (DIM <= 64 ? 4 : 2) : 1;
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
    const f32x16 norm = set1_16(1.f / l[r]);
    for (int v = 0; v < DIM / 16; ++v) {
      store16(out + 16 * v, mul16(norm, loadu16(acc.data() + r * DIM + 16 * v)));
    }
  }
}

#if defined(DEEPSERVE_HAVE_AMX)
using bf16 = c10::BFloat16;

// Keys per step of the AMX path: two 16-key score tiles, then one 32-key product per dim block.
constexpr int64_t kAmxKeys = 32;

// Tiles of the AMX path (TileConfig::full(), all 16 rows x 64 bytes): 0-1 the scores of 16
// positions against a step's keys [0, 16) and [16, 32) (float32); 2 the positions' queries, one
// 32-dim chunk (A); 3-4 the two key groups' packed chunk (B); 5 one 16-dim block of the outputs
// (float32, loaded, accumulated, stored); 6 the positions' probabilities for the step's 32 keys
// (A); 7 the packed values of that dim block (B).

// Keys [0, keys_padded) of one (chunk, kv head) as B operands of Q.K^T: for each 16 keys and
// 32-dim chunk, [16 dim pairs][16 keys] of 32-bit (two bfloat16) words; zero past the context.
template <int DIM>
void pack_keys(const bf16* k_cache, const Shape& s, const Chunk& c, int64_t kv_head,
               int64_t keys_padded, uint32_t* packed) {
  constexpr int kWords = DIM / 2;
  for (int64_t pos = 0; pos < keys_padded; ++pos) {
    uint32_t row[kWords] = {};
    if (pos < c.context_len) std::memcpy(row, cache_row(k_cache, s, c, kv_head, pos), DIM * 2);
    uint32_t* group = packed + (pos / 16) * (DIM / 32) * 256 + pos % 16;
    for (int w = 0; w < kWords; ++w) group[(w / 16) * 256 + (w % 16) * 16] = row[w];
  }
}

// Values [0, keys_padded) as B operands of P.V: for each 32 keys and 16-dim block,
// [16 key pairs][16 dims] of words (the pair's two values of a dim); zero past the context.
template <int DIM>
void pack_values(const bf16* v_cache, const Shape& s, const Chunk& c, int64_t kv_head,
                 int64_t keys_padded, uint32_t* packed) {
  for (int64_t pos = 0; pos < keys_padded; pos += 2) {
    uint16_t first[DIM] = {}, second[DIM] = {};
    if (pos < c.context_len) std::memcpy(first, cache_row(v_cache, s, c, kv_head, pos), DIM * 2);
    if (pos + 1 < c.context_len) {
      std::memcpy(second, cache_row(v_cache, s, c, kv_head, pos + 1), DIM * 2);
    }
    uint32_t* pair = packed + (pos / kAmxKeys) * (DIM / 16) * 256 + (pos % kAmxKeys) / 2 * 16;
    for (int d = 0; d < DIM; ++d) {
      pair[(d / 16) * 256 + d % 16] = first[d] | (static_cast<uint32_t>(second[d]) << 16);
    }
  }
}

// One work item on AMX: positions [i0, i1) (at most 16) of the chunk, each head of the kv head's
// group in turn.
template <int DIM>
void attend_tile_amx(const bf16* q_data, const Shape& s, const Chunk& c, int64_t kv_head,
                     int64_t i0, int64_t i1, float scale, const uint32_t* keys_packed,
                     const uint32_t* values_packed, bf16* out_data) {
  alignas(64) bf16 q[16 * DIM];
  alignas(64) float scores[16 * kAmxKeys];
  alignas(64) bf16 probs[16 * kAmxKeys];
  alignas(64) float o[16 * DIM];
  const int64_t rows = i1 - i0;
  const int64_t first_pos = c.context_len - c.n;
  const int64_t keys = first_pos + i1;  // the last row sees keys [0, keys)
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 scale16 = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < s.group; ++g) {
    const int64_t head = kv_head * s.group + g;
    // The rows' queries; rows past the item's are zero and see every key (their output is
    // dropped), so no row is ever wholly masked.
    for (int64_t r = 0; r < 16; ++r) {
      if (r < rows) {
        std::memcpy(q + r * DIM, q_data + (c.q_start + i0 + r) * s.q_token_stride + head * s.q_head_stride, DIM * 2);
      } else {
        std::memset(static_cast<void*>(q + r * DIM), 0, DIM * 2);
      }
    }
    float m[16], l[16];
    int32_t row_pos[16];
    for (int r = 0; r < 16; ++r) {
      m[r] = -std::numeric_limits<float>::infinity();
      l[r] = 0.f;
      row_pos[r] = r < rows ? static_cast<int32_t>(first_pos + i0 + r) : std::numeric_limits<int32_t>::max();
    }
    std::memset(o, 0, sizeof(o));
    for (int64_t k0 = 0; k0 < keys; k0 += kAmxKeys) {
      _tile_zero(0);
      _tile_zero(1);
      for (int chunk = 0; chunk < DIM / 32; ++chunk) {
        const uint32_t* group = keys_packed + ((k0 / 16) * (DIM / 32) + chunk) * 256;
        _tile_loadd(2, q + 32 * chunk, DIM * 2);
        _tile_loadd(3, group, 64);
        _tile_loadd(4, group + (DIM / 32) * 256, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
      }
      _tile_stored(0, scores, kAmxKeys * 4);
      _tile_stored(1, scores + 16, kAmxKeys * 4);
      // Online softmax, a row at a time: causal mask, new max, the old sum and outputs rescaled.
      for (int r = 0; r < 16; ++r) {
        __m512 sr[2];
        __mmask16 seen[2];
        for (int h = 0; h < 2; ++h) {
          const __m512i key_pos = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(k0 + 16 * h)));
          seen[h] = _mm512_cmple_epi32_mask(key_pos, _mm512_set1_epi32(row_pos[r]));
          sr[h] = _mm512_mask_blend_ps(seen[h], minus_inf,
                                       _mm512_mul_ps(_mm512_load_ps(scores + r * kAmxKeys + 16 * h), scale16));
        }
        const float m_new = std::max(m[r], _mm512_reduce_max_ps(_mm512_max_ps(sr[0], sr[1])));
        const __m512 shift = _mm512_set1_ps(m_new);
        const __m512 p0 = _mm512_maskz_mov_ps(seen[0], fast_exp16(_mm512_sub_ps(sr[0], shift)));
        const __m512 p1 = _mm512_maskz_mov_ps(seen[1], fast_exp16(_mm512_sub_ps(sr[1], shift)));
        const __m512bh packed = _mm512_cvtne2ps_pbh(p1, p0);
        _mm512_store_si512(probs + r * kAmxKeys, (__m512i)packed);
        const float alpha = deepserve_kernels::fast_exp(m[r] - m_new);
        l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
        m[r] = m_new;
        if (alpha != 1.f) {
          const __m512 a = _mm512_set1_ps(alpha);
          for (int v = 0; v < DIM / 16; ++v) {
            _mm512_store_ps(o + r * DIM + 16 * v, _mm512_mul_ps(a, _mm512_load_ps(o + r * DIM + 16 * v)));
          }
        }
      }
      _tile_loadd(6, probs, kAmxKeys * 2);
      const uint32_t* values = values_packed + (k0 / kAmxKeys) * (DIM / 16) * 256;
      for (int block = 0; block < DIM / 16; ++block) {
        _tile_loadd(5, o + 16 * block, DIM * 4);
        _tile_loadd(7, values + block * 256, 64);
        _tile_dpbf16ps(5, 6, 7);
        _tile_stored(5, o + 16 * block, DIM * 4);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      bf16* out = out_data + (c.q_start + i0 + r) * s.out_token_stride + head * DIM;
      const __m512 norm = _mm512_set1_ps(1.f / l[r]);
      for (int v = 0; v < DIM / 16; ++v) {
        store16(out + 16 * v, _mm512_mul_ps(norm, _mm512_load_ps(o + r * DIM + 16 * v)));
      }
    }
  }
}
#endif

// Items: (chunk, kv head, tile of positions), costliest (most keys) first for the dynamic
// schedule.
struct Item {
  int64_t chunk, kv_head, i0, i1, keys;
};

std::vector<Item> costliest_first(const std::vector<Chunk>& chunks, int64_t kv_heads) {
  std::vector<Item> items;
  for (int64_t ci = 0; ci < static_cast<int64_t>(chunks.size()); ++ci) {
    const Chunk& c = chunks[ci];
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t i0 = 0; i0 < c.n; i0 += kTile) {
        const int64_t i1 = std::min(c.n, i0 + kTile);
        items.push_back({ci, h, i0, i1, c.context_len - c.n + i1});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.keys > b.keys; });
  return items;
}

// The vector path: keys transposed into float panels, scores and outputs by FMA.
template <typename T, int DIM>
void prefill_vector(const Shape& s, const std::vector<Chunk>& chunks, const std::vector<Item>& items,
                    const T* q_data, const T* k_cache, const T* v_cache, float scale, T* out_data) {
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  // Each chunk's panels start here (floats), one run per kv head of head_panel_floats[chunk].
  std::vector<int64_t> panel_offset(num_chunks + 1, 0), head_panel_floats(num_chunks);
  for (int64_t i = 0; i < num_chunks; ++i) {
    head_panel_floats[i] = (chunks[i].context_len + kKeys - 1) / kKeys * DIM * kKeys;
    panel_offset[i + 1] = panel_offset[i] + s.kv_heads * head_panel_floats[i];
  }
  // Every float is written by transpose_keys (zeros past a context): no initialisation.
  const std::unique_ptr<float[]> panels(new float[panel_offset[num_chunks]]);
  auto head_panels = [&](int64_t chunk, int64_t kv_head) {
    return panels.get() + panel_offset[chunk] + kv_head * head_panel_floats[chunk];
  };
  const int64_t heads_items = num_chunks * s.kv_heads;
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
      attend_tile<T, DIM>(q_data, v_cache, s, chunks[it.chunk], it.kv_head, it.i0, it.i1, scale,
                          head_panels(it.chunk, it.kv_head), out_data);
    }
  }
}

#if defined(DEEPSERVE_HAVE_AMX)
// The AMX path: keys and values packed per (chunk, kv head), then the items on tiles.
template <int DIM>
void prefill_amx(const Shape& s, const std::vector<Chunk>& chunks, const std::vector<Item>& items,
                 const bf16* q_data, const bf16* k_cache, const bf16* v_cache, float scale,
                 bf16* out_data) {
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  // Words of one kv head's packed keys (and as many of its values) per chunk, and where each
  // chunk's run starts.
  std::vector<int64_t> offset(num_chunks + 1, 0), head_words(num_chunks);
  for (int64_t i = 0; i < num_chunks; ++i) {
    head_words[i] = (chunks[i].context_len + kAmxKeys - 1) / kAmxKeys * kAmxKeys * DIM / 2;
    offset[i + 1] = offset[i] + s.kv_heads * head_words[i];
  }
  // Every word is written by pack_keys and pack_values: no initialisation.
  const std::unique_ptr<uint32_t[]> keys(new uint32_t[offset[num_chunks]]);
  const std::unique_ptr<uint32_t[]> values(new uint32_t[offset[num_chunks]]);
  auto head_run = [&](uint32_t* base, int64_t chunk, int64_t kv_head) {
    return base + offset[chunk] + kv_head * head_words[chunk];
  };
  const int64_t heads_items = num_chunks * s.kv_heads;
  const deepserve_kernels::TileConfig config = deepserve_kernels::TileConfig::full();
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < heads_items; ++item) {
      const int64_t ci = item / s.kv_heads, h = item % s.kv_heads;
      const int64_t padded = head_words[ci] * 2 / DIM;
      pack_keys<DIM>(k_cache, s, chunks[ci], h, padded, head_run(keys.get(), ci, h));
      pack_values<DIM>(v_cache, s, chunks[ci], h, padded, head_run(values.get(), ci, h));
    }
    const deepserve_kernels::TileScope tiles(config);
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < static_cast<int64_t>(items.size()); ++index) {
      const Item& it = items[index];
      attend_tile_amx<DIM>(q_data, s, chunks[it.chunk], it.kv_head, it.i0, it.i1, scale,
                           head_run(keys.get(), it.chunk, it.kv_head),
                           head_run(values.get(), it.chunk, it.kv_head), out_data);
    }
  }
}
#endif

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
  for (int64_t i = 0; i < num_chunks; ++i) {
    chunks[i] = {query_starts.data_ptr<int64_t>()[i], query_lens.data_ptr<int64_t>()[i],
                 context_lens.data_ptr<int64_t>()[i],
                 block_tables.data_ptr<int64_t>() + i * s.max_blocks};
  }
  const std::vector<Item> items = costliest_first(chunks, s.kv_heads);
  const T* q_data = query.data_ptr<T>();
  const T* k_cache = key_cache.data_ptr<T>();
  const T* v_cache = value_cache.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const float softmax_scale = static_cast<float>(scale);
#if defined(DEEPSERVE_HAVE_AMX)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (deepserve_kernels::amx_permitted()) {
      prefill_amx<DIM>(s, chunks, items, q_data, k_cache, v_cache, softmax_scale, out_data);
      return;
    }
  }
#endif
  prefill_vector<T, DIM>(s, chunks, items, q_data, k_cache, v_cache, softmax_scale, out_data);
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

#endif  // DEEPSERVE_VEC16
