// Running tasks 0..n-1 on the calling thread and XLA's intra-op pool, for eej's CPU kernels (cpu_*.cc).
//
// Tasks are claimed from a shared counter. The caller claims too and then waits only for tasks already claimed,
// so a busy or one-thread pool cannot deadlock it; a pool thread that starts after everything was claimed finds
// nothing to do. The counters live in a shared_ptr, so a late pool thread never touches freed memory.

#ifndef EEJ_KERNELS_CPU_PARALLEL_H_
#define EEJ_KERNELS_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace eej {

template <typename Task>
void parallel_tasks(xla::ffi::ThreadPool& pool, int64_t n, Task task) {
  struct Shared {
    Shared(Task task, int64_t n) : task(std::move(task)), n(n) {}
    Task task;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
    void run() {
      for (int64_t i; (i = next.fetch_add(1)) < n;) {
        task(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>(std::move(task), n);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->run(); });
  shared->run();
  while (shared->done.load(std::memory_order_acquire) < n) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }
}

}  // namespace eej

#endif  // EEJ_KERNELS_CPU_PARALLEL_H_
