// Intel AMX tiles for the kernels: whether this process may use them, and their configuration.
//
// Linux hands out the tile registers' state only to processes that ask (arch_prctl
// ARCH_REQ_XCOMP_PERM); oneDNN asks when it first runs an AMX matmul, but a kernel may run first.
// A thread's tile configuration is its own and oneDNN loads its own between our calls, so each
// kernel loads its configuration on every thread it runs on and releases the tiles after.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define DEEPSERVE_HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace deepserve_kernels {

// True once the kernel granted this process the AMX tile data state (asked once).
inline bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kXtileData = 18;         // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return permitted;
}

// The 64-byte operand of ldtilecfg (palette 1): rows and bytes per row of each of 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  TileConfig& tile(int index, int row_count, int bytes_per_row) {
    rows[index] = static_cast<uint8_t>(row_count);
    colsb[index] = static_cast<uint16_t>(bytes_per_row);
    return *this;
  }

  // All 8 tiles 16 rows x 64 bytes (the largest shape), as most kernels use them.
  static TileConfig full() {
    TileConfig config;
    for (int index = 0; index < 8; ++index) config.tile(index, 16, 64);
    return config;
  }
};

// Loads a configuration for the enclosing scope on this thread; releases the tiles when done.
class TileScope {
 public:
  explicit TileScope(const TileConfig& config) { _tile_loadconfig(&config); }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

}  // namespace deepserve_kernels
#endif
