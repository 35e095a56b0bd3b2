// Linear layers for few activation rows (decode steps), for CPU: y[M, N] = x[M, K] @ W[N, K]^T.
//
// A decode step multiplies a handful of rows by every weight of the model once, so it is bound
// by how fast the weights stream from memory, not by arithmetic. General GEMM libraries block
// for reuse instead; at 8-32 rows oneDNN read SmolLM2's weights at well under the bandwidth two
// cores fetch (bench/RESULTS.md, issue #19). This kernel stores each weight matrix in panels of
// 32 output columns, each panel one contiguous [K][32] run, so a thread reads its panels as one
// sequential stream, once per step: the first 8 rows stream the panel from memory and further
// rows find it in L2. Rows go 8 at a time through a register tile of 8 x 32 float accumulators.
//
// float32: one FMA per (row, column, k), summed in k order. bfloat16 (avx512_bf16): the panel
// holds k pairs, [K/2][32][2], and vdpbf16ps adds two products per lane into float accumulators;
// the output is rounded to bfloat16 once, at the end.
//
// bfloat16 on hosts with AMX: the same panels are the tiles' B operands as they lie (16 k pairs x
// 16 columns a tile), and up to 32 rows are two A tiles, so the arithmetic per weight byte stays
// far below what the tiles do and the weights stream at memory speed at any row count; the vector
// path's vdpbf16ps per (row, k pair) made it arithmetic-bound from a few rows on.
//
// float32 is written on vec16.h's 16-lane rows, so AVX2 hosts run it too, 2 rows a register tile.
//
// Panels go to the forward pass's own threads, two at a time to whichever is free
// (shared_work.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "amx_tiles.h"
#include "layer_kernels.h"
#include "shared_work.h"
#include "vec16.h"
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kPanel = 32;  // output columns per panel (two 16-lane vectors)
// Rows per register tile: R x 32 accumulators, the panel step's 32 weights and a broadcast row
// value must fit the vector registers: 8 rows in 32 zmm, 2 in AVX2's 16 ymm (3 spilled: 1.06-1.15x
// the time at 1-8 rows).
#if defined(DEEPSERVE_VEC16)
constexpr int64_t kRowTile = deepserve_kernels::kVecRegs == 32 ? 8 : 2;
#else
constexpr int64_t kRowTile = 8;
#endif
// Most rows one call takes (the accumulators of a panel live in one L1-sized buffer); more rows
// are a prefill's, where a blocked GEMM wins anyway.
constexpr int64_t kMaxRows = 64;
#ifndef SKINNY_CHUNK_STEPS
#define SKINNY_CHUNK_STEPS 128
#endif
#ifndef SKINNY_PREFETCH_STEPS
#define SKINNY_PREFETCH_STEPS 64
#endif
// Whether one row tile's pass streams the panel behind software prefetches. On AVX2 hosts the
// hardware prefetcher alone streamed the 1-row chain faster (1.17x a sum()'s time against 1.34x
// with prefetches 64 steps ahead; T1, NTA, 16 or 256 steps ahead: 1.24-1.33x; 2-core Zen 3).
// Several row tiles keep their spread prefetches there too (without: 1.1-1.2x slower at 4-16).
#if defined(DEEPSERVE_VEC16)
constexpr bool kStreamPrefetch = deepserve_kernels::kVecRegs == 32;
#endif
// Panel steps per chunk: 128 x 128 bytes = 16 KB, which stays in L1 across the row tiles.
constexpr int64_t kChunkSteps = SKINNY_CHUNK_STEPS;
// How far ahead of the FMAs the panel is prefetched (64 steps = 8 KB).
constexpr int64_t kPrefetchSteps = SKINNY_PREFETCH_STEPS;

// W [N, K] -> panels [ceil(N/32), K, 32] (float32) or [ceil(N/32), K/2, 32, 2] (bfloat16),
// columns past N zero.
at::Tensor skinny_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be [N, K]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "weight must be float32 or bfloat16");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t panels = (n + kPanel - 1) / kPanel;
  if (w.scalar_type() == at::kFloat) {
    at::Tensor packed = at::zeros({panels, k, kPanel}, w.options());
    const float* src = w.data_ptr<float>();
    float* dst = packed.data_ptr<float>();
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t c = 0; c < kPanel && p * kPanel + c < n; ++c) {
          const float* row = src + (p * kPanel + c) * k;
          float* out = dst + p * k * kPanel + c;
          for (int64_t i = 0; i < k; ++i) out[i * kPanel] = row[i];
        }
      }
    });
    return packed;
  }
  TORCH_CHECK(k % 2 == 0, "bfloat16 packing needs an even K");
  at::Tensor packed = at::zeros({panels, k / 2, kPanel, 2}, w.options());
  const c10::BFloat16* src = w.data_ptr<c10::BFloat16>();
  c10::BFloat16* dst = packed.data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t c = 0; c < kPanel && p * kPanel + c < n; ++c) {
        const c10::BFloat16* row = src + (p * kPanel + c) * k;
        c10::BFloat16* out = dst + p * k * kPanel + c * 2;
        for (int64_t i = 0; i < k / 2; ++i) {
          out[i * kPanel * 2] = row[2 * i];
          out[i * kPanel * 2 + 1] = row[2 * i + 1];
        }
      }
    }
  });
  return packed;
}

#if defined(DEEPSERVE_VEC16)

using deepserve_kernels::f32x16;

inline void prefetch(const void* address) {
  _mm_prefetch(reinterpret_cast<const char*>(address), _MM_HINT_T0);
}

// Prefetches weights ahead of a chunk pass's FMAs, one call per step (a step of a panel is 128
// bytes in either dtype): either a stream, two lines a step walking with the steps from
// `ahead`, or `lines` lines from `ahead` spread evenly over `steps` steps.
class Prefetcher {
 public:
  static Prefetcher stream(const char* ahead) { return Prefetcher(ahead, 0, 1, true); }
  static Prefetcher spread(const char* ahead, int64_t lines, int64_t steps) {
    return Prefetcher(ahead, lines, lines > 0 ? std::max<int64_t>(1, steps / lines) : 1, false);
  }
  static Prefetcher none() { return Prefetcher(nullptr, 0, 1, false); }

  inline void step(int64_t i) {
    if (stream_) {
      prefetch(ahead_ + 128 * i);
      prefetch(ahead_ + 128 * i + 64);
    } else if (--countdown_ == 0) {
      countdown_ = every_;
      if (line_ < lines_) prefetch(ahead_ + 64 * line_++);
    }
  }

 private:
  Prefetcher(const char* ahead, int64_t lines, int64_t every, bool stream)
      : ahead_(ahead), lines_(lines), every_(every), countdown_(every), stream_(stream) {}

  const char* ahead_;
  int64_t lines_, every_, countdown_, line_ = 0;
  bool stream_;
};

// acc[R][32] (+)= rows [0, R) of x times steps [0, steps) of one panel chunk. A float32 step is
// one k; a bfloat16 step is one k pair. `prefetcher` fetches weights ahead meanwhile.
template <int R, bool BF16>
inline void tile(const void* x_, int64_t ldx, const void* chunk_, int64_t steps, float* acc_buf,
                 bool first, Prefetcher prefetcher) {
  using namespace deepserve_kernels;
  f32x16 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = first ? zero16() : loadu16(acc_buf + r * kPanel);
    acc[r][1] = first ? zero16() : loadu16(acc_buf + r * kPanel + 16);
  }
  if constexpr (!BF16) {
    const float* x = static_cast<const float*>(x_);
    const float* chunk = static_cast<const float*>(chunk_);
    for (int64_t i = 0; i < steps; ++i) {
      prefetcher.step(i);
      const f32x16 w0 = loadu16(chunk + i * kPanel);
      const f32x16 w1 = loadu16(chunk + i * kPanel + 16);
      for (int r = 0; r < R; ++r) {
        const f32x16 xv = set1_16(x[r * ldx + i]);
        acc[r][0] = fmadd16(xv, w0, acc[r][0]);
        acc[r][1] = fmadd16(xv, w1, acc[r][1]);
      }
    }
  } else {
#if defined(__AVX512BF16__)
    const c10::BFloat16* x = static_cast<const c10::BFloat16*>(x_);
    const c10::BFloat16* chunk = static_cast<const c10::BFloat16*>(chunk_);
    for (int64_t i = 0; i < steps; ++i) {
      prefetcher.step(i);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(chunk + i * kPanel * 2);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(chunk + i * kPanel * 2 + 32);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + r * ldx + 2 * i, sizeof(pair));
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
      }
    }
#endif
  }
  for (int r = 0; r < R; ++r) {
    storeu16(acc_buf + r * kPanel, acc[r][0]);
    storeu16(acc_buf + r * kPanel + 16, acc[r][1]);
  }
}

template <bool BF16>
inline void tile_rows(int64_t rows, const void* x, int64_t ldx, const void* chunk, int64_t steps,
                      float* acc_buf, bool first, Prefetcher prefetcher) {
  switch (rows) {
    case 8: tile<8, BF16>(x, ldx, chunk, steps, acc_buf, first, prefetcher); break;
    case 7: tile<7, BF16>(x, ldx, chunk, steps, acc_buf, first, prefetcher); break;
    case 6: tile<6, BF16>(x, ldx, chunk, steps, acc_buf, first, prefetcher); break;
    case 5: tile<5, BF16>(x, ldx, chunk, steps, acc_buf, first, prefetcher); break;
    case 4: tile<4, BF16>(x, ldx, chunk, steps, acc_buf, first, prefetcher); break;
    case 3: tile<3, BF16>(x, ldx, chunk, steps, acc_buf, first, prefetcher); break;
    case 2: tile<2, BF16>(x, ldx, chunk, steps, acc_buf, first, prefetcher); break;
    default: tile<1, BF16>(x, ldx, chunk, steps, acc_buf, first, prefetcher); break;
  }
}

#if defined(__AVX512F__)
inline __m512 bf16_to_float(__m256i v) {
  // A bfloat16 is the high half of a float's bits.
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// y[row, col + j] = acc[row][j] + bias[col + j] for j < width, in y's dtype.
template <typename T>
inline void store_rows(const float* acc_buf, int64_t rows, T* y, int64_t ldy, int64_t width,
                       const T* bias) {
  const __mmask16 lo = width >= 16 ? 0xFFFF : (__mmask16)((1u << width) - 1);
  const __mmask16 hi =
      width >= 32 ? 0xFFFF : width <= 16 ? 0 : (__mmask16)((1u << (width - 16)) - 1);
  __m512 b0 = _mm512_setzero_ps(), b1 = b0;
  if constexpr (std::is_same_v<T, float>) {
    if (bias != nullptr) {
      b0 = _mm512_maskz_loadu_ps(lo, bias);
      b1 = _mm512_maskz_loadu_ps(hi, bias + 16);
    }
    for (int64_t r = 0; r < rows; ++r) {
      _mm512_mask_storeu_ps(y + r * ldy, lo, _mm512_add_ps(_mm512_loadu_ps(acc_buf + r * kPanel), b0));
      _mm512_mask_storeu_ps(y + r * ldy + 16, hi,
                            _mm512_add_ps(_mm512_loadu_ps(acc_buf + r * kPanel + 16), b1));
    }
  } else {
#if defined(__AVX512BF16__)
    if (bias != nullptr) {
      b0 = bf16_to_float(_mm256_maskz_loadu_epi16(lo, bias));
      b1 = bf16_to_float(_mm256_maskz_loadu_epi16(hi, bias + 16));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(acc_buf + r * kPanel), b0);
      const __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(acc_buf + r * kPanel + 16), b1);
      _mm256_mask_storeu_epi16(y + r * ldy, lo, (__m256i)_mm512_cvtneps_pbh(v0));
      _mm256_mask_storeu_epi16(y + r * ldy + 16, hi, (__m256i)_mm512_cvtneps_pbh(v1));
    }
#endif
  }
}
#else
// The same on AVX2 hosts, float32 only (the kernel has no bfloat16 path without AVX-512).
template <typename T>
inline void store_rows(const float* acc_buf, int64_t rows, T* y, int64_t ldy, int64_t width,
                       const T* bias) {
  static_assert(std::is_same_v<T, float>, "AVX2 hosts run float32 only");
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) {
      y[r * ldy + j] = acc_buf[r * kPanel + j] + (bias != nullptr ? bias[j] : 0.f);
    }
  }
}
#endif

// One panel: y[:, 32 columns] for every row. K goes in chunks small enough to stay in L1 while
// every row tile passes over them, so the panel streams from memory once and without pauses
// whatever the number of rows. `acc_buf` is the calling thread's, kMaxRows x 32 floats.
template <typename T>
inline void run_panel(const T* x, int64_t m, int64_t k, const T* packed, int64_t n, T* y,
                      const T* bias, int64_t p, float* acc_buf) {
  constexpr bool kBF16 = !std::is_same_v<T, float>;
  constexpr int64_t kValuesPerStep = kBF16 ? 2 : 1;  // k values per step of a panel
  const int64_t steps = k / kValuesPerStep;
  const T* panel = packed + p * k * kPanel;
  const int64_t col = p * kPanel;
  for (int64_t s0 = 0; s0 < steps; s0 += kChunkSteps) {
    const int64_t chunk_steps = std::min(kChunkSteps, steps - s0);
    const T* chunk = panel + s0 * kPanel * kValuesPerStep;
    // Weights are prefetched ahead of the FMAs. One row tile: a stream kPrefetchSteps ahead (on
    // AVX2, the hardware prefetcher's alone: kStreamPrefetch). Several: the next chunk (the rest
    // of this panel, then the next panel, which is contiguous) is spread over this chunk's
    // passes, so that reading memory overlaps the arithmetic of every pass, not only the
    // first's (0.78-0.94x the time at 16-32 rows; bench/RESULTS.md, issue #19).
    const int64_t passes = (m + kRowTile - 1) / kRowTile;
    const char* ahead = reinterpret_cast<const char*>(
        chunk + (passes == 1 ? kPrefetchSteps : chunk_steps) * kPanel * kValuesPerStep);
    const int64_t lines = chunk_steps * kPanel * kValuesPerStep * int64_t(sizeof(T)) / 64;
    for (int64_t row = 0, pass = 0; row < m; row += kRowTile, ++pass) {
      const int64_t first_line = lines * pass / passes, end_line = lines * (pass + 1) / passes;
      const Prefetcher prefetcher =
          passes == 1 ? (kStreamPrefetch ? Prefetcher::stream(ahead) : Prefetcher::none())
                      : Prefetcher::spread(ahead + 64 * first_line, end_line - first_line,
                                           chunk_steps);
      tile_rows<kBF16>(std::min(kRowTile, m - row), x + row * k + s0 * kValuesPerStep, k, chunk,
                       chunk_steps, acc_buf + row * kPanel, s0 == 0, prefetcher);
    }
  }
  for (int64_t row = 0; row < m; row += kRowTile) {
    store_rows<T>(acc_buf + row * kPanel, std::min(kRowTile, m - row), y + row * n + col, n,
                  std::min(kPanel, n - col), bias != nullptr ? bias + col : nullptr);
  }
}

// One thread's accumulators, for one panel at a time.
struct alignas(64) PanelAccumulators {
  float values[kMaxRows * kPanel];
};

// Every panel, two a turn to whichever thread is free (share_work), at least 4 per thread.
template <typename T>
void run_panels(const T* x, int64_t m, int64_t k, const T* packed, int64_t n, T* y,
                const T* bias) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  deepserve_kernels::share_work(panels, 2, 4, [&] {
    return [&, accumulators = PanelAccumulators{}](int64_t begin, int64_t end) mutable {
      for (int64_t p = begin; p < end; ++p) {
        run_panel<T>(x, m, k, packed, n, y, bias, p, accumulators.values);
      }
    };
  });
}

#if defined(DEEPSERVE_HAVE_AMX)
// Rows the AMX path takes: two row tiles (four accumulator tiles beside two A and two B).
constexpr int64_t kAmxMaxRows = 32;
// Panel chunks (32 k values, 2 KB) fetched ahead of the tile loads.
constexpr int64_t kAmxChunksAhead = 4;

// Tiles (TileConfig::full(), all 16 rows x 64 bytes): 0-3 the accumulators (row tile r, column
// half h: tile 2r + h, float32); 4-5 the rows' 32 k values (A, one per row tile); 6-7 a panel
// chunk's two column halves (B: 16 k pairs x 16 columns, at a 128-byte stride in the panel).

// y = x @ W^T (+ bias) for up to 32 rows, K a multiple of 32, on AMX tiles. x is copied into
// whole row tiles (zero rows past m); the rows past m are computed and dropped.
void run_panels_amx(const c10::BFloat16* x, int64_t m, int64_t k, const c10::BFloat16* packed,
                    int64_t n, c10::BFloat16* y, const c10::BFloat16* bias) {
  const int64_t row_tiles = (m + 15) / 16;
  std::vector<uint16_t> rows(row_tiles * 16 * k, 0);
  std::memcpy(rows.data(), x, m * k * 2);
  const uint16_t* a = rows.data();
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const deepserve_kernels::TileConfig config = deepserve_kernels::TileConfig::full();
  at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
    const deepserve_kernels::TileScope tiles(config);
    alignas(64) float acc_buf[kAmxMaxRows * kPanel];
    for (int64_t p = begin; p < end; ++p) {
      const c10::BFloat16* panel = packed + p * k * kPanel;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kc = 0; kc < k; kc += 32) {
        const c10::BFloat16* chunk = panel + kc * kPanel;  // 16 k pairs x 32 columns x 2
        // The next panel is contiguous with this one, so fetching past its end is useful too.
        const char* ahead = reinterpret_cast<const char*>(chunk + kAmxChunksAhead * 32 * kPanel);
        for (int line = 0; line < 32; ++line) prefetch(ahead + 64 * line);
        _tile_loadd(6, chunk, kPanel * 4);
        _tile_loadd(7, chunk + 32, kPanel * 4);
        _tile_loadd(4, a + kc, k * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (row_tiles > 1) {
          _tile_loadd(5, a + 16 * k + kc, k * 2);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, acc_buf, kPanel * 4);
      _tile_stored(1, acc_buf + 16, kPanel * 4);
      if (row_tiles > 1) {
        _tile_stored(2, acc_buf + 16 * kPanel, kPanel * 4);
        _tile_stored(3, acc_buf + 16 * kPanel + 16, kPanel * 4);
      }
      const int64_t col = p * kPanel;
      store_rows<c10::BFloat16>(acc_buf, m, y + col, n, std::min(kPanel, n - col),
                                bias != nullptr ? bias + col : nullptr);
    }
  });
}
#endif

#endif  // DEEPSERVE_VEC16

}  // namespace

namespace deepserve_kernels {

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "x and the packed weight differ in dtype");
  const at::Tensor a = x.contiguous();
  const int64_t m = a.size(0), k = a.size(1);
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  TORCH_CHECK(packed.size(0) == (n + kPanel - 1) / kPanel, "packed weight has the wrong panels");
  TORCH_CHECK(bf16 ? packed.size(1) * 2 == k : packed.size(1) == k,
              "packed weight has the wrong K");
  at::Tensor y = at::empty({m, n}, a.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == n && b.scalar_type() == a.scalar_type(), "bias must be [N], x's dtype");
  }
  TORCH_CHECK(m <= kMaxRows, "skinny_linear takes at most ", kMaxRows, " rows");
  if (m == 0) return y;
#if defined(DEEPSERVE_VEC16)
  if (!bf16) {
    run_panels<float>(a.data_ptr<float>(), m, k, packed.data_ptr<float>(), n,
                      y.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr);
    return y;
  }
#if defined(__AVX512BF16__)
  using bf = c10::BFloat16;
#if defined(DEEPSERVE_HAVE_AMX)
  if (m <= kAmxMaxRows && k % 32 == 0 && deepserve_kernels::amx_permitted()) {
    run_panels_amx(a.data_ptr<bf>(), m, k, packed.data_ptr<bf>(), n, y.data_ptr<bf>(),
                   b.defined() ? b.data_ptr<bf>() : nullptr);
    return y;
  }
#endif
  run_panels<bf>(a.data_ptr<bf>(), m, k, packed.data_ptr<bf>(), n, y.data_ptr<bf>(),
                 b.defined() ? b.data_ptr<bf>() : nullptr);
  return y;
#endif
#endif
  TORCH_CHECK(false, "skinny_linear: not built for this dtype on this CPU");
}

}  // namespace deepserve_kernels

TORCH_LIBRARY_FRAGMENT(deepserve_flowserve, m) {
  m.def("skinny_pack(Tensor weight) -> Tensor");
  m.def("skinny_linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(deepserve_flowserve, CPU, m) {
  m.impl("skinny_pack", &skinny_pack);
  m.impl("skinny_linear", &deepserve_kernels::skinny_linear);
}
