// Decode attention read in place from a paged KV cache, for CPU.
//
// One query token per sequence. Each (sequence, kv head) is one work item on ATen's thread pool:
// the item walks the sequence's block table once for keys and once for values, serving up to
// four query heads of its GQA group from each key/value row loaded into registers, so each
// cached byte is read from memory once. Where one thread takes all of a sequence's kv heads
// and they fit L2, it reads whole token rows instead (`attend_sequence`): one run of memory, not a
// strided part of each row per kv head (0.71-0.74x the time at 32 sequences of 265 tokens).
// The Python fallback gathers the blocks into a buffer first and reads them again in SDPA.
// In bfloat16 on hosts with AMX, the scores of 16 keys for every head of the group are one tile
// product and the values are weighed two tokens per instruction (avx512_bf16), because the
// float32 arithmetic of the vector path, not memory, bounded it there (9-17 GB/s).
// The vector path is written on vec16.h's 16-lane rows, so AVX2 hosts run it too (0.34-0.54x
// the time of the per-head loop they ran before; bench/RESULTS.md, issue #19).
//
// Built once per host by library.py (torch.utils.cpp_extension), registered as
// torch.ops.deepserve_flowserve.paged_decode.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "amx_tiles.h"
#include "layer_kernels.h"
#include "scalar_math.h"
#include "shared_work.h"
#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <unistd.h>

namespace {

template <typename T>
inline float as_float(T value) {
  return deepserve_kernels::to_float(value);
}

#if defined(DEEPSERVE_VEC16)
using deepserve_kernels::f32x16;
using deepserve_kernels::fmadd16;
using deepserve_kernels::load16;
using deepserve_kernels::loadu16;
using deepserve_kernels::mul16;
using deepserve_kernels::reduce_add16;
using deepserve_kernels::set1_16;
using deepserve_kernels::store16;
using deepserve_kernels::storeu16;
using deepserve_kernels::zero16;
#endif

// q . row over one head's dim values (q already float).
template <typename T>
inline float dot(const float* q, const T* row, int64_t dim) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < dim; ++i) sum += q[i] * as_float(row[i]);
  return sum;
}

// acc += p * row over one head's dim values.
template <typename T>
inline void axpy(float p, const T* row, float* acc, int64_t dim) {
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) acc[i] += p * as_float(row[i]);
}

// s[t] = exp(s[t] - max s) in place; returns 1 / their sum (the softmax's normaliser).
inline float softmax_numerators(float* s, int64_t len) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < len; ++t) top = std::max(top, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < len; ++t) {
    s[t] = deepserve_kernels::fast_exp(s[t] - top);
    sum += s[t];
  }
  return 1.f / sum;
}

// Strides and sizes of one call, in elements.
struct Layout {
  int64_t heads, kv_heads, group, block_size, max_blocks;
  int64_t block_stride, token_stride, head_stride, q_seq_stride, q_head_stride;
  // Most bytes of a sequence's keys and values (all kv heads) that `attend_sequence` takes at
  // once (a share of L2); 0 when one thread does not take all of a sequence's heads.
  int64_t whole_rows_bytes = 0;
};

// A share of this core's L2 (sysconf, read once; 1 MiB where it does not say).
inline int64_t l2_budget_bytes() {
  static const int64_t budget = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return static_cast<int64_t>(l2 > 0 ? l2 : (1 << 20)) * 3 / 4;
  }();
  return budget;
}

// One (sequence, kv head), for head sizes without a vector path (`attend_group`): every query
// head of the group, each over the sequence's keys, then its values (a head's later passes find
// the rows in L2).
template <typename T>
void attend(const Layout& l, int64_t dim, const T* q_data, const T* k_data, const T* v_data,
            const int64_t* table, int64_t seq, int64_t kv_head, int64_t len, float scale,
            float* scores, float* q_f, float* acc, T* out_data) {
  const int64_t k_base = kv_head * l.head_stride;
  for (int64_t g = 0; g < l.group; ++g) {
    const T* q_row = q_data + seq * l.q_seq_stride + (kv_head * l.group + g) * l.q_head_stride;
    for (int64_t i = 0; i < dim; ++i) q_f[i] = as_float(q_row[i]) * scale;
    float* s = scores;
    // Scores: the keys, block by block.
    for (int64_t start = 0; start < len; start += l.block_size) {
      const T* block = k_data + table[start / l.block_size] * l.block_stride + k_base;
      const int64_t count = std::min(l.block_size, len - start);
      for (int64_t t = 0; t < count; ++t) {
        s[start + t] = dot<T>(q_f, block + t * l.token_stride, dim);
      }
    }
    const float inv_sum = softmax_numerators(s, len);
    // Output: the values weighted by the scores.
    for (int64_t i = 0; i < dim; ++i) acc[i] = 0.f;
    for (int64_t start = 0; start < len; start += l.block_size) {
      const T* block = v_data + table[start / l.block_size] * l.block_stride + k_base;
      const int64_t count = std::min(l.block_size, len - start);
      for (int64_t t = 0; t < count; ++t) {
        axpy<T>(s[start + t], block + t * l.token_stride, acc, dim);
      }
    }
    T* o = out_data + (seq * l.heads + kv_head * l.group + g) * dim;
    for (int64_t i = 0; i < dim; ++i) o[i] = deepserve_kernels::from_float<T>(acc[i] * inv_sum);
  }
}

#if defined(DEEPSERVE_VEC16)
// Calls row_fn(row loaded as DIM / 16 vectors, position) for every cached row of one kv head (at
// `head_offset` elements into each token's row) in order. Each row read prefetches
// `fetch_bytes` of its twin in the next block, so the cache streams from memory without waiting
// on each block's first row (spread over the rows rather than a burst of the block's lines at
// its start).
template <typename T, int DIM, typename RowFn>
inline void for_each_row(const Layout& l, const T* cache, const int64_t* table, int64_t head_offset,
                         int64_t len, int64_t fetch_bytes, RowFn&& row_fn) {
  constexpr int V = DIM / 16;
  const int64_t row_bytes = l.token_stride * static_cast<int64_t>(sizeof(T));
  const int64_t num_blocks = (len + l.block_size - 1) / l.block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const char* next =
        b + 1 < num_blocks
            ? reinterpret_cast<const char*>(cache + table[b + 1] * l.block_stride + head_offset)
            : nullptr;
    const T* block = cache + table[b] * l.block_stride + head_offset;
    const int64_t start = b * l.block_size;
    const int64_t count = std::min(l.block_size, len - start);
    for (int64_t t = 0; t < count; ++t) {
      if (next != nullptr) {
        for (int64_t byte = 0; byte < fetch_bytes; byte += 64) {
          _mm_prefetch(next + t * row_bytes + byte, _MM_HINT_T0);
        }
      }
      const T* row = block + t * l.token_stride;
      f32x16 x[V];
      for (int v = 0; v < V; ++v) x[v] = load16(row + 16 * v);
      row_fn(x, start + t);
    }
  }
}

// One query head's query, scaled, as DIM / 16 vectors (the same bits wherever it is made).
template <typename T, int DIM>
inline void scaled_query(const Layout& l, const T* q_data, int64_t seq, int64_t head, float scale,
                         f32x16* q) {
  const T* q_row = q_data + seq * l.q_seq_stride + head * l.q_head_stride;
  for (int v = 0; v < DIM / 16; ++v) q[v] = mul16(load16(q_row + 16 * v), set1_16(scale));
}

// One score: q . k over DIM, in a fixed order (the same bits in either pass below).
template <int DIM>
inline float score(const f32x16* q, const f32x16* k) {
  f32x16 acc = mul16(q[0], k[0]);
  for (int v = 1; v < DIM / 16; ++v) acc = fmadd16(q[v], k[v], acc);
  return reduce_add16(acc);
}

// Softmax of GS heads' scores ([GS][len] at `scores`), then one pass over one kv head's values
// that accumulates all GS outputs in registers.
template <typename T, int DIM, int GS>
void weigh_values(const Layout& l, const T* v_data, const int64_t* table, int64_t seq,
                  int64_t kv_head, int64_t g0, int64_t len, int64_t fetch_bytes, float* scores,
                  T* out_data) {
  constexpr int V = DIM / 16;
  float inv_sum[GS];
  for (int h = 0; h < GS; ++h) inv_sum[h] = softmax_numerators(scores + h * len, len);
  f32x16 o[GS][V];
  for (int h = 0; h < GS; ++h)
    for (int v = 0; v < V; ++v) o[h][v] = zero16();
  for_each_row<T, DIM>(l, v_data, table, kv_head * l.head_stride, len, fetch_bytes,
                       [&](const f32x16* val, int64_t pos) {
                         for (int h = 0; h < GS; ++h) {
                           const f32x16 p = set1_16(scores[h * len + pos]);
                           for (int v = 0; v < V; ++v) o[h][v] = fmadd16(p, val[v], o[h][v]);
                         }
                       });
  for (int h = 0; h < GS; ++h) {
    T* out = out_data + (seq * l.heads + kv_head * l.group + g0 + h) * DIM;
    const f32x16 norm = set1_16(inv_sum[h]);
    for (int v = 0; v < V; ++v) store16(out + 16 * v, mul16(o[h][v], norm));
  }
}

// GS query heads of one kv head, DIM a multiple of 16: one pass over the keys scores all GS
// heads from each key row (loaded into registers once), then `weigh_values`.
template <typename T, int DIM, int GS>
void attend_heads(const Layout& l, const T* q_data, const T* k_data, const T* v_data,
                  const int64_t* table, int64_t seq, int64_t kv_head, int64_t g0, int64_t len,
                  float scale, float* scores, T* out_data) {
  constexpr int V = DIM / 16;
  f32x16 q[GS][V];
  for (int h = 0; h < GS; ++h) scaled_query<T, DIM>(l, q_data, seq, kv_head * l.group + g0 + h, scale, q[h]);
  const int64_t fetch_bytes = DIM * static_cast<int64_t>(sizeof(T));
  for_each_row<T, DIM>(l, k_data, table, kv_head * l.head_stride, len, fetch_bytes,
                       [&](const f32x16* k, int64_t pos) {
                         for (int h = 0; h < GS; ++h) scores[h * len + pos] = score<DIM>(q[h], k);
                       });
  weigh_values<T, DIM, GS>(l, v_data, table, seq, kv_head, g0, len, fetch_bytes, scores, out_data);
}

// Calls pass(std::integral_constant<int, GS>, g0) over a group's query heads, GS at a time: as
// many as the registers hold (queries, one cached row and the outputs: 4 heads of 64 dims, 2 of
// 128; AVX2's 16 ymm, 2 and 1, where 3 heads of 64 at once measured the same), then the rest.
template <int DIM, typename Pass>
inline void by_register_groups(int64_t group, Pass&& pass) {
  constexpr int kMost =
      deepserve_kernels::kVecRegs == 32 ? (DIM <= 64 ? 4 : 2) : (DIM <= 64 ? 2 : 1);
  int64_t g = 0;
  for (; g + kMost <= group; g += kMost) pass(std::integral_constant<int, kMost>{}, g);
  switch (group - g) {
    case 3: pass(std::integral_constant<int, 3>{}, g); break;
    case 2: pass(std::integral_constant<int, 2>{}, g); break;
    case 1: pass(std::integral_constant<int, 1>{}, g); break;
    default: break;
  }
}

// Every query head of one (sequence, kv head).
template <typename T, int DIM>
void attend_group(const Layout& l, const T* q_data, const T* k_data, const T* v_data,
                  const int64_t* table, int64_t seq, int64_t kv_head, int64_t len, float scale,
                  float* scores, T* out_data) {
  by_register_groups<DIM>(l.group, [&](auto gs, int64_t g) {
    attend_heads<T, DIM, decltype(gs)::value>(l, q_data, k_data, v_data, table, seq, kv_head, g,
                                              len, scale, scores, out_data);
  });
}

// Whether one thread attends all of a sequence's kv heads with `attend_sequence`: it takes them
// all (l.whole_rows_bytes > 0) and the sequence's keys and values fit that share of L2.
template <typename T>
inline bool whole_sequence(const Layout& l, int64_t len) {
  return l.kv_heads > 1 &&
         2 * len * l.token_stride * static_cast<int64_t>(sizeof(T)) <= l.whole_rows_bytes;
}

// Every query head of one sequence, reading whole token rows (every kv head's part, one run of
// memory) instead of a strided part of each row per kv head. Keys: one pass over the rows scores
// every head, the queries kept in `queries` ([heads][DIM], more than the registers hold).
// Values: a pass per kv head, the first fetching whole rows so that the later ones find theirs
// in L2. Each score, softmax and output is computed as `attend_group` computes it: the same bits.
template <typename T, int DIM>
void attend_sequence(const Layout& l, const T* q_data, const T* k_data, const T* v_data,
                     const int64_t* table, int64_t seq, int64_t len, float scale, float* scores,
                     float* queries, T* out_data) {
  constexpr int V = DIM / 16;
  for (int64_t head = 0; head < l.heads; ++head) {
    f32x16 q[V];
    scaled_query<T, DIM>(l, q_data, seq, head, scale, q);
    for (int v = 0; v < V; ++v) storeu16(queries + head * DIM + 16 * v, q[v]);
  }
  const int64_t whole_row_bytes = l.kv_heads * l.head_stride * static_cast<int64_t>(sizeof(T));
  // Its own walk over the rows rather than `for_each_row` handing out row pointers: that version
  // took 1.10x this one's time (32 x 265, float32, 3 paired rounds).
  const int64_t row_bytes = l.token_stride * static_cast<int64_t>(sizeof(T));
  const int64_t num_blocks = (len + l.block_size - 1) / l.block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const char* next = b + 1 < num_blocks
                           ? reinterpret_cast<const char*>(k_data + table[b + 1] * l.block_stride)
                           : nullptr;
    const T* block = k_data + table[b] * l.block_stride;
    const int64_t start = b * l.block_size;
    const int64_t count = std::min(l.block_size, len - start);
    for (int64_t t = 0; t < count; ++t) {
      if (next != nullptr) {
        for (int64_t byte = 0; byte < whole_row_bytes; byte += 64) {
          _mm_prefetch(next + t * row_bytes + byte, _MM_HINT_T0);
        }
      }
      const T* row = block + t * l.token_stride;
      for (int64_t kv_head = 0; kv_head < l.kv_heads; ++kv_head) {
        f32x16 k[V];
        for (int v = 0; v < V; ++v) k[v] = load16(row + kv_head * l.head_stride + 16 * v);
        for (int64_t head = kv_head * l.group; head < (kv_head + 1) * l.group; ++head) {
          f32x16 q[V];
          for (int v = 0; v < V; ++v) q[v] = loadu16(queries + head * DIM + 16 * v);
          scores[head * len + start + t] = score<DIM>(q, k);
        }
      }
    }
  }
  for (int64_t kv_head = 0; kv_head < l.kv_heads; ++kv_head) {
    const int64_t fetch_bytes =
        kv_head == 0 ? whole_row_bytes : DIM * static_cast<int64_t>(sizeof(T));
    by_register_groups<DIM>(l.group, [&](auto gs, int64_t g) {
      weigh_values<T, DIM, decltype(gs)::value>(l, v_data, table, seq, kv_head, g, len,
                                                fetch_bytes,
                                                scores + (kv_head * l.group + g) * len, out_data);
    });
  }
}
#endif

#if defined(DEEPSERVE_HAVE_AMX)
using bf16 = c10::BFloat16;

// Tiles of the bfloat16 path: 0 holds the scores of 16 keys for every query head of the group
// (C, [16 keys][group] float32); 1 and 2 hold 16 key rows' 32-dim chunks (A, alternating by
// chunk so that one load overlaps the previous product); 3 and 4 the same chunk of the queries
// (B, [16 dim pairs][group]).
inline deepserve_kernels::TileConfig decode_tile_config(int64_t group) {
  const int head_bytes = static_cast<int>(group) * 4;
  deepserve_kernels::TileConfig config;
  config.tile(0, 16, head_bytes).tile(1, 16, 64).tile(2, 16, 64);
  config.tile(3, 16, head_bytes).tile(4, 16, head_bytes);
  return config;
}

// Per-thread buffers of the bfloat16 path, sized by the longest sequence seen.
struct AmxScratch {
  std::vector<float> scores;     // [group][padded]: scaled scores, then softmax numerators
  std::vector<uint16_t> probs;   // [group][padded]: the numerators in bfloat16, 0 past len
  std::vector<uint32_t> queries; // [dim / 2][group]: the B operands
  alignas(64) float tile_out[16 * 16];
};

// Fetches this kv head's rows of a block of the cache ahead.
inline void prefetch_block(const bf16* cache, const Layout& l, int64_t block, int64_t kv_head,
                           int dim) {
  const bf16* start = cache + block * l.block_stride + kv_head * l.head_stride;
  for (int64_t t = 0; t < l.block_size; ++t) {
    const char* row = reinterpret_cast<const char*>(start + t * l.token_stride);
    for (int byte = 0; byte < dim * 2; byte += 64) _mm_prefetch(row + byte, _MM_HINT_T0);
  }
}

// scores[h][pos] = scale * q_h . k_pos for every head h of the group: one tile product per 16
// keys (a block holds whole tiles: block_size is a multiple of 16). Rows of the last tile past
// len are read (they lie inside the block) but their scores are dropped.
template <int DIM>
void score_keys_amx(const Layout& l, const bf16* k_data, const int64_t* table, int64_t kv_head,
                    int64_t len, int64_t padded, float scale, AmxScratch& s) {
  const int64_t group = l.group;
  const int64_t k_base = kv_head * l.head_stride;
  const int64_t row_bytes = l.token_stride * 2;
  const int64_t head_bytes = group * 4;
  const uint32_t* q = s.queries.data();
  const int64_t num_blocks = (len + l.block_size - 1) / l.block_size;
  for (int64_t start = 0; start < len; start += 16) {
    const int64_t b = start / l.block_size;
    const int64_t offset = start % l.block_size;
    if (offset == 0 && b + 1 < num_blocks) prefetch_block(k_data, l, table[b + 1], kv_head, DIM);
    const bf16* rows = k_data + table[b] * l.block_stride + k_base + offset * l.token_stride;
    _tile_zero(0);
    for (int c = 0; c < DIM / 32; c += 2) {
      _tile_loadd(1, rows + 32 * c, row_bytes);
      _tile_loadd(3, q + c * 16 * group, head_bytes);
      _tile_dpbf16ps(0, 1, 3);
      if (c + 1 < DIM / 32) {
        _tile_loadd(2, rows + 32 * (c + 1), row_bytes);
        _tile_loadd(4, q + (c + 1) * 16 * group, head_bytes);
        _tile_dpbf16ps(0, 2, 4);
      }
    }
    _tile_stored(0, s.tile_out, head_bytes);
    const int64_t count = std::min<int64_t>(16, len - start);
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t h = 0; h < group; ++h) {
        s.scores[h * padded + start + t] = s.tile_out[t * group + h] * scale;
      }
    }
  }
}

// probs[0, padded) = numerators[0, len) in bfloat16 (nearest even), then a 0 to fill the pair.
inline void to_bf16_probs(const float* numerators, int64_t len, int64_t padded, uint16_t* probs) {
  for (int64_t t = 0; t < padded; t += 16) {
    const __mmask16 in = len - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - t)) - 1);
    const __mmask16 out = padded - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (padded - t)) - 1);
    const __m256bh half = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(in, numerators + t));
    _mm256_mask_storeu_epi16(probs + t, out, (__m256i)half);
  }
}

// out_h = inv_sum_h * sum_pos p_h[pos] v_pos for GS heads: two tokens per dpbf16 (their rows
// interleaved 16 bits at a time, the probabilities broadcast as a pair). The interleave leaves
// each 128-bit lane's dims in the order 0-3 (lo) and 4-7 (hi); the stores put them back.
template <int DIM, int GS>
void weigh_values_amx(const Layout& l, const bf16* v_data, const int64_t* table, int64_t kv_head,
                      int64_t len, int64_t padded, const uint16_t* probs, const float* inv_sum,
                      bf16* out) {
  constexpr int V = DIM / 32;  // 512-bit loads per row
  const int64_t k_base = kv_head * l.head_stride;
  __m512 acc[GS][2 * V];
  for (int h = 0; h < GS; ++h)
    for (int v = 0; v < 2 * V; ++v) acc[h][v] = _mm512_setzero_ps();
  const int64_t num_blocks = (len + l.block_size - 1) / l.block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch_block(v_data, l, table[b + 1], kv_head, DIM);
    const bf16* block = v_data + table[b] * l.block_stride + k_base;
    const int64_t start = b * l.block_size;
    const int64_t count = std::min(l.block_size, len - start);
    for (int64_t t = 0; t < count; t += 2) {
      const bf16* row = block + t * l.token_stride;
      // The second row of an odd tail is not part of the sequence: zeros, not whatever is there.
      const bool pair = t + 1 < count;
      __m512i lo[V], hi[V];
      for (int v = 0; v < V; ++v) {
        const __m512i a = _mm512_loadu_si512(row + 32 * v);
        const __m512i b2 =
            pair ? _mm512_loadu_si512(row + l.token_stride + 32 * v) : _mm512_setzero_si512();
        lo[v] = _mm512_unpacklo_epi16(a, b2);
        hi[v] = _mm512_unpackhi_epi16(a, b2);
      }
      for (int h = 0; h < GS; ++h) {
        uint32_t two;
        std::memcpy(&two, probs + h * padded + start + t, sizeof(two));
        const __m512bh p = (__m512bh)_mm512_set1_epi32(two);
        for (int v = 0; v < V; ++v) {
          acc[h][2 * v] = _mm512_dpbf16_ps(acc[h][2 * v], (__m512bh)lo[v], p);
          acc[h][2 * v + 1] =
              _mm512_dpbf16_ps(acc[h][2 * v + 1], (__m512bh)hi[v], p);
        }
      }
    }
  }
  // Output dim d of a 32-dim chunk sits in lane 4 (d / 8) + d % 4 of lo (d % 8 < 4) or of hi.
  alignas(64) static const int32_t kFirst[16] = {0, 1, 2, 3, 16, 17, 18, 19,
                                                 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static const int32_t kSecond[16] = {8,  9,  10, 11, 24, 25, 26, 27,
                                                  12, 13, 14, 15, 28, 29, 30, 31};
  const __m512i first = _mm512_load_si512(kFirst);
  const __m512i second = _mm512_load_si512(kSecond);
  for (int h = 0; h < GS; ++h) {
    const __m512 norm = _mm512_set1_ps(inv_sum[h]);
    for (int v = 0; v < V; ++v) {
      const __m512 low = _mm512_permutex2var_ps(acc[h][2 * v], first, acc[h][2 * v + 1]);
      const __m512 high = _mm512_permutex2var_ps(acc[h][2 * v], second, acc[h][2 * v + 1]);
      deepserve_kernels::store16(out + h * DIM + 32 * v, _mm512_mul_ps(low, norm));
      deepserve_kernels::store16(out + h * DIM + 32 * v + 16, _mm512_mul_ps(high, norm));
    }
  }
}

// One (sequence, kv head) in bfloat16 on AMX: every head's scores, their softmax, then the
// values for up to as many heads per pass as the registers hold (4 of 64 dims, 2 of 128).
template <int DIM>
void attend_group_amx(const Layout& l, const bf16* q_data, const bf16* k_data, const bf16* v_data,
                      const int64_t* table, int64_t seq, int64_t kv_head, int64_t len, float scale,
                      AmxScratch& s, bf16* out_data) {
  const int64_t group = l.group;
  const int64_t k_base = kv_head * l.head_stride;
  const int64_t padded = (len + 1) & ~int64_t{1};
  if (static_cast<int64_t>(s.scores.size()) < group * padded) {
    s.scores.resize(group * padded);
    s.probs.resize(group * padded);
  }
  s.queries.resize(DIM / 2 * group);
  for (int64_t h = 0; h < group; ++h) {
    const bf16* q_row = q_data + seq * l.q_seq_stride + (kv_head * group + h) * l.q_head_stride;
    uint32_t two;
    for (int64_t i = 0; i < DIM / 2; ++i) {
      std::memcpy(&two, q_row + 2 * i, sizeof(two));
      s.queries[i * group + h] = two;
    }
  }
  score_keys_amx<DIM>(l, k_data, table, kv_head, len, padded, scale, s);
  float inv_sum[16];
  for (int64_t h = 0; h < group; ++h) {
    inv_sum[h] = softmax_numerators(s.scores.data() + h * padded, len);
    to_bf16_probs(s.scores.data() + h * padded, len, padded, s.probs.data() + h * padded);
  }
  constexpr int kMost = DIM <= 64 ? 4 : 2;
  bf16* out = out_data + (seq * l.heads + kv_head * group) * DIM;
  int64_t g = 0;
  for (; g + kMost <= group; g += kMost) {
    weigh_values_amx<DIM, kMost>(l, v_data, table, kv_head, len, padded,
                                 s.probs.data() + g * padded, inv_sum + g, out + g * DIM);
  }
  const uint16_t* probs = s.probs.data() + g * padded;
  switch (group - g) {
    case 3:
      weigh_values_amx<DIM, 3>(l, v_data, table, kv_head, len, padded, probs, inv_sum + g, out + g * DIM);
      break;
    case 2:
      weigh_values_amx<DIM, 2>(l, v_data, table, kv_head, len, padded, probs, inv_sum + g, out + g * DIM);
      break;
    case 1:
      weigh_values_amx<DIM, 1>(l, v_data, table, kv_head, len, padded, probs, inv_sum + g, out + g * DIM);
      break;
    default:
      break;
  }
}

// The AMX path serves this bfloat16 call: a head size it has, whole tiles per block, a group
// that fits one tile's columns, and the tile state granted.
inline bool amx_serves(int64_t dim, const Layout& l) {
  return (dim == 64 || dim == 128) && l.block_size % 16 == 0 && l.group <= 16 &&
         deepserve_kernels::amx_permitted();
}

void paged_decode_amx(const Layout& l, int64_t seqs, int64_t dim, const bf16* q_data,
                      const bf16* k_data, const bf16* v_data, const int64_t* tables,
                      const int64_t* lens, float scale, bf16* out_data) {
  const deepserve_kernels::TileConfig config = decode_tile_config(l.group);
  at::parallel_for(0, seqs * l.kv_heads, 1, [&](int64_t begin, int64_t end) {
    const deepserve_kernels::TileScope tiles(config);
    AmxScratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / l.kv_heads;
      const int64_t kv_head = item % l.kv_heads;
      const int64_t* table = tables + seq * l.max_blocks;
      if (dim == 64) {
        attend_group_amx<64>(l, q_data, k_data, v_data, table, seq, kv_head, lens[seq], scale,
                             scratch, out_data);
      } else {
        attend_group_amx<128>(l, q_data, k_data, v_data, table, seq, kv_head, lens[seq], scale,
                              scratch, out_data);
      }
    }
  });
}
#endif

template <typename T>
void paged_decode_impl(const at::Tensor& query, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, const at::Tensor& block_tables,
                       const at::Tensor& context_lens, at::Tensor& out, double scale) {
  const int64_t seqs = query.size(0);
  const int64_t dim = query.size(2);
  Layout l;
  l.heads = query.size(1);
  l.kv_heads = key_cache.size(2);
  l.group = l.heads / l.kv_heads;
  l.block_size = key_cache.size(1);
  l.max_blocks = block_tables.size(1);
  l.block_stride = key_cache.stride(0);
  l.token_stride = key_cache.stride(1);
  l.head_stride = key_cache.stride(2);
  l.q_seq_stride = query.stride(0);
  l.q_head_stride = query.stride(1);

  const T* q_data = query.data_ptr<T>();
  const T* k_data = key_cache.data_ptr<T>();
  const T* v_data = value_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* out_data = out.data_ptr<T>();
  const float softmax_scale = static_cast<float>(scale);
#if defined(DEEPSERVE_HAVE_AMX)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (amx_serves(dim, l)) {
      paged_decode_amx(l, seqs, dim, q_data, k_data, v_data, tables, lens, softmax_scale, out_data);
      return;
    }
  }
#endif

  // A sequence's kv heads a turn: contexts differ in length, and cores in speed (share_work).
  // Its heads lie interleaved in each token's row, so one thread reads them all (heads shared
  // between the threads: 1.1x slower at 8 sequences); a few sequences split by head instead.
  const int64_t heads_a_turn = seqs >= 4 ? l.kv_heads : 1;
  if (heads_a_turn == l.kv_heads) l.whole_rows_bytes = l2_budget_bytes();
  deepserve_kernels::share_work(seqs * l.kv_heads, heads_a_turn, 1, [&] {
    return [&, q_f = std::vector<float>(dim), acc = std::vector<float>(dim),
            scores = std::vector<float>(), queries = std::vector<float>()](
               int64_t begin, int64_t end) mutable {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t seq = item / l.kv_heads;
        const int64_t kv_head = item % l.kv_heads;
        const int64_t len = lens[seq];
        const int64_t* table = tables + seq * l.max_blocks;
#if defined(DEEPSERVE_VEC16)
        // A turn of whole sequences (its first item): all of it at once, by whole rows.
        if (kv_head == 0 && end - item >= l.kv_heads && whole_sequence<T>(l, len) &&
            (dim == 64 || dim == 128)) {
          scores.resize(len * l.heads);
          queries.resize(dim * l.heads);
          if (dim == 64) {
            attend_sequence<T, 64>(l, q_data, k_data, v_data, table, seq, len, softmax_scale,
                                   scores.data(), queries.data(), out_data);
          } else {
            attend_sequence<T, 128>(l, q_data, k_data, v_data, table, seq, len, softmax_scale,
                                    scores.data(), queries.data(), out_data);
          }
          item += l.kv_heads - 1;
          continue;
        }
#endif
        // Scores of up to 4 heads at once (the vector path); one at a time otherwise.
        scores.resize(len * std::min<int64_t>(l.group, 4));
#if defined(DEEPSERVE_VEC16)
        if (dim == 64) {
          attend_group<T, 64>(l, q_data, k_data, v_data, table, seq, kv_head, len, softmax_scale,
                              scores.data(), out_data);
          continue;
        }
        if (dim == 128) {
          attend_group<T, 128>(l, q_data, k_data, v_data, table, seq, kv_head, len, softmax_scale,
                               scores.data(), out_data);
          continue;
        }
#endif
        attend<T>(l, dim, q_data, k_data, v_data, table, seq, kv_head, len, softmax_scale,
                  scores.data(), q_f.data(), acc.data(), out_data);
      }
    };
  });
}

}  // namespace

namespace deepserve_kernels {

// query [seqs, heads, dim]; caches [blocks, block_size, kv_heads, dim]; block_tables
// [seqs, max_blocks] int64; context_lens [seqs] int64 (>= 1). Returns [seqs, heads, dim].
at::Tensor paged_decode(const at::Tensor& query, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& block_tables,
                        const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "query 3-D and caches 4-D");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "key and value caches differ in shape");
  TORCH_CHECK(key_cache.strides() == value_cache.strides(), "key and value caches differ in layout");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() &&
                  key_cache.scalar_type() == value_cache.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(key_cache.stride(3) == 1 && query.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(query.size(2) == key_cache.size(3), "head_dim differs");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "heads not a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.dim() == 2 && block_tables.size(0) == query.size(0),
              "block_tables must be contiguous int64 [seqs, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() &&
                  context_lens.numel() == query.size(0),
              "context_lens must be contiguous int64 [seqs]");
  at::Tensor out = at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  if (query.scalar_type() == at::kFloat) {
    paged_decode_impl<float>(query, key_cache, value_cache, block_tables, context_lens, out, scale);
  } else if (query.scalar_type() == at::kBFloat16) {
    paged_decode_impl<c10::BFloat16>(query, key_cache, value_cache, block_tables, context_lens,
                                     out, scale);
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and bfloat16, not ", query.scalar_type());
  }
  return out;
}

}  // namespace deepserve_kernels

namespace {

// Whether the kernels' bfloat16 paths run on AMX tiles in this process (built for a CPU with
// AMX, and the kernel granted the tile state).
bool amx_tiles() {
#if defined(DEEPSERVE_HAVE_AMX)
  return deepserve_kernels::amx_permitted();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(deepserve_flowserve, m) {
  m.def(
      "paged_decode(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
  m.def("amx_tiles() -> bool", &amx_tiles);
}

TORCH_LIBRARY_IMPL(deepserve_flowserve, CPU, m) { m.impl("paged_decode", &deepserve_kernels::paged_decode); }
