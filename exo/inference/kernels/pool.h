// exo's kernel thread pool: workers started once per process, woken per product.
//
// A decode token runs ~60 products of ~0.1-1 ms each; starting a thread per part per call (tens of
// microseconds each) or waking a condition variable cost as much as the second core gave back
// (docs/benchmarks.md). As llama.cpp and OpenMP do, a worker spins on a generation counter for a
// short while after each product (the next one usually follows within microseconds) and only then
// sleeps on a futex; the caller wakes sleepers only when there are any.
#pragma once

#include <immintrin.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace exo_pool {

using Task = void (*)(const void* ctx, int part, int parts);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Microseconds a worker spins for the next product before it sleeps (EXO_KERNEL_SPIN_US).
inline long spin_us() {
  static const long us = [] {
    const char* v = std::getenv("EXO_KERNEL_SPIN_US");
    const long n = v ? std::atol(v) : 100;
    return n < 0 ? 0L : n;
  }();
  return us;
}

class Pool {
 public:
  explicit Pool(int workers) : pid_(getpid()) {
    for (int i = 1; i <= workers; i++) threads_.emplace_back([this, i] { work(i); });
  }
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  // Never destroyed (a process-wide pool outlives the module's users); workers are detached.
  ~Pool() = delete;

  int size() const { return int(threads_.size()) + 1; }
  pid_t pid() const { return pid_; }

  // task(ctx, part, parts) for every part in [0, parts), parts <= size(): part 0 on the caller.
  void run(Task task, const void* ctx, int parts) {
    task_ = task;
    ctx_ = ctx;
    parts_ = parts;
    pending_.store(int(threads_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) wake();
    task(ctx, 0, parts);
    for (long spins = 0; pending_.load(std::memory_order_acquire) != 0; spins++) {
      if (spins < 20000)
        cpu_relax();
      else
        std::this_thread::yield();  // a descheduled worker: give it the core
    }
  }

 private:
  void wake() {
#ifdef __linux__
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation_), FUTEX_WAKE_PRIVATE, INT_MAX,
            nullptr, nullptr, 0);
#else
    generation_.notify_all();
#endif
  }

  void sleep(uint32_t seen) {
#ifdef __linux__
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation_), FUTEX_WAIT_PRIVATE, seen, nullptr,
            nullptr, 0);
#else
    generation_.wait(seen);
#endif
  }

  void work(int index) {
    // Generation 0 is "no product yet": a worker that starts after the first run() (thread
    // start-up is slow) must still see that run as new.
    uint32_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; spins++) {
        cpu_relax();
        if ((spins & 63) == 63 && std::chrono::steady_clock::now() >= until) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          while (generation_.load(std::memory_order_seq_cst) == seen) sleep(seen);
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < parts_) task_(ctx_, index, parts_);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  pid_t pid_;
  std::vector<std::thread> threads_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  Task task_ = nullptr;
  const void* ctx_ = nullptr;
  int parts_ = 0;
};

// task over `parts` parts (<= threads) on the process's pool of `threads` (always the same
// number: started on first use, again in a forked child, which keeps only the calling thread).
// A second caller while the pool is busy (products from two threads at once) runs its parts
// itself, in turn.
inline void parallel_for(int parts, int threads, Task task, const void* ctx) {
  static std::mutex busy;
  static Pool* pool = nullptr;
  if (parts > 1 && parts <= threads) {
    std::unique_lock<std::mutex> lock(busy, std::try_to_lock);
    if (lock.owns_lock()) {
      if (pool == nullptr || pool->pid() != getpid())
        pool = new Pool(threads - 1);  // a fork's stale pool is left unreferenced (no threads)
      pool->run(task, ctx, parts);
      return;
    }
  }
  for (int part = 0; part < parts; part++) task(ctx, part, parts);
}

inline int kernel_threads() {
  // EXO_KERNEL_THREADS, else the cores this process may run on (a pinned runner gets its own):
  // decode-shaped products are split over output rows.
  static const int threads = [] {
    const char* v = std::getenv("EXO_KERNEL_THREADS");
    int n = v ? std::atoi(v) : 0;
#ifdef __linux__
    cpu_set_t set;
    if (n <= 0 && sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
    if (n <= 0) n = int(std::thread::hardware_concurrency());
    return n < 1 ? 1 : (n > 16 ? 16 : n);
  }();
  return threads;
}

// body(o0, o1) over [0, out) split in contiguous ranges on the pool, one range per `per_part`
// outputs at most kernel_threads() (small products stay on the caller).
template <class Body>
void split_outputs(int out, int per_part, const Body& body) {
  const int threads = kernel_threads();
  const int parts = std::min(threads, std::max(1, out / per_part));
  if (parts == 1) {
    body(0, out);
    return;
  }
  struct Context {
    const Body* body;
    int out;
  } context{&body, out};
  parallel_for(
      parts, threads,
      [](const void* raw, int part, int parts) {
        const auto& c = *static_cast<const Context*>(raw);
        const int chunk = (c.out + parts - 1) / parts;
        (*c.body)(std::min(c.out, part * chunk), std::min(c.out, (part + 1) * chunk));
      },
      &context);
}

}  // namespace exo_pool
