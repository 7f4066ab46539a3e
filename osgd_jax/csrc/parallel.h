// Work items spread over XLA's intra-op thread pool, shared by the kernels.
//
// The calling thread is one of the workers and waits only for items that
// have started, so a call cannot deadlock on a pool whose threads are busy
// with other kernels of the same program (a training step runs several at
// once). Tasks may start after the call has returned (they then find no
// work), so they share ownership of the counters.

#ifndef OSGD_JAX_CSRC_PARALLEL_H_
#define OSGD_JAX_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace osgd_jax {

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> workers{0};
  std::mutex mu;
  std::condition_variable cv;
};

// Runs run(worker, item) for every item in [0, num_items) on at most
// `workers` threads, the caller included; `worker` is in [0, workers) and
// no two threads share one, so it can index per-thread scratch.
template <typename Run>
void ParallelItems(xla::ffi::ThreadPool& pool, int64_t num_items,
                   int64_t workers, Run&& run) {
  workers = std::max<int64_t>(
      1, std::min<int64_t>({workers, num_items, pool.num_threads() + 1}));
  if (workers <= 1) {
    for (int64_t i = 0; i < num_items; ++i) run(0, i);
    return;
  }
  auto progress = std::make_shared<Progress>();
  // `run`'s captures are only touched by tasks that took an item, which
  // this call waits for.
  auto drain = [progress, num_items, &run]() {
    int64_t worker = -1;
    for (int64_t i; (i = progress->next.fetch_add(1)) < num_items;) {
      if (worker < 0) worker = progress->workers.fetch_add(1);
      run(worker, i);
      if (progress->done.fetch_add(1) + 1 == num_items) {
        std::lock_guard<std::mutex> lock(progress->mu);
        progress->cv.notify_all();
      }
    }
  };
  for (int64_t w = 1; w < workers; ++w) {
    auto task = drain;
    pool.Schedule(std::move(task));
  }
  drain();
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->cv.wait(lock, [&] { return progress->done.load() == num_items; });
}

}  // namespace osgd_jax

#endif  // OSGD_JAX_CSRC_PARALLEL_H_
