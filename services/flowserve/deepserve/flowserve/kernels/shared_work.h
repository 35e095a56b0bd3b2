// Work shared out to the forward pass's threads as they free up, instead of in equal halves.
//
// ATen's parallel_for gives each thread an equal, fixed share, so a call lasts as long as its
// slowest thread. On a shared host the two cores of a forward pass rarely run at one speed: the
// control plane's processes, the client and a neighbour's load take turns on either core, and
// a thread that loses its core for a while holds the whole call back while its partner waits.
// Here each thread takes the next chunk of items when it finishes one, so the other thread does
// the rest meanwhile (skinny matmuls at 16-48 rows: 0.84-0.97x the time of equal shares on a
// quiet 2-core Zen 3, 0.86x at 32 rows beside an interfering process; bench/RESULTS.md, #19).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace deepserve_kernels {

// Calls worker(begin, end) over [0, items) in chunks of `chunk` items, each chunk taken by the
// next free thread. `make_worker()` runs once on each thread first, so per-thread scratch lives
// in the worker it returns. At most one thread per `grain` items; serial inside a parallel
// region (as parallel_for).
template <typename MakeWorker>
void share_work(int64_t items, int64_t chunk, int64_t grain, const MakeWorker& make_worker) {
  if (items <= 0) return;
  const int64_t threads =
      std::min<int64_t>(at::get_num_threads(), (items + grain - 1) / std::max<int64_t>(grain, 1));
#if defined(_OPENMP)
  if (threads > 1 && !omp_in_parallel()) {
    const int64_t chunks = (items + chunk - 1) / chunk;
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      auto worker = make_worker();
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < chunks; ++c) worker(c * chunk, std::min(items, (c + 1) * chunk));
    }
    return;
  }
#endif
  auto worker = make_worker();
  worker(int64_t{0}, items);
}

}  // namespace deepserve_kernels
