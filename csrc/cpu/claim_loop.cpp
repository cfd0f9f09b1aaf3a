// The claim loop of claim_loop.h: a lazily started pool of at::get_num_threads() - 1 threads,
// parked on condition variables between loops, that join a loop by claiming its chunks.
//
// Lifetime: a loop's state (Job) outlives the loop, so a helper that wakes after the caller has
// returned either finds no loop published or still reads valid counters, finds no chunk left
// and parks again; a Job is reused only once no helper holds it.  The body, which references
// the caller's stack, runs only for chunks claimed while some were left, and the caller returns
// only once all of those have finished.
//
// Waiting: waking a parked thread takes tens of microseconds, as long as a whole loop at the
// sizes where threads start to pay off, so after its part of a loop a helper stays awake a
// while (spinning, and yielding its core every microsecond or two) and back-to-back loops on a
// quiet machine find it ready, as OpenMP's spinning team does.  On a busy machine the spin would
// take a core from other work, and a helper that has spent its share of the core is the more
// likely to be preempted in the middle of a chunk, which the caller then waits for: so once a
// yield shows that another thread wanted the core, or the helper was spinning and still came too
// late, it parks straight after each loop for a while.  A helper that takes up a loop long after
// it was published means the cores are taken: the callers then stop waking helpers for a while
// (growing while helpers keep coming late), since a woken helper would only compete with the
// threads that hold the cores, an OpenMP team waiting at its barrier among them.  The caller
// spins while the last claimed chunks (a microsecond or two each) finish, and blocks only if
// that takes long (a helper preempted in a chunk).
#include "claim_loop.h"

#include <ATen/Parallel.h>
#include <c10/util/thread_name.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <pthread.h>
#endif

namespace cvr::ops {
namespace {

using Clock = std::chrono::steady_clock;

// A helper stays awake for kIdleSpin after its part of a loop, unless a yield of its core took
// longer than kPreempted (another thread ran: the core is wanted); it then parks at once after
// each loop for kBackoff.  A helper that takes up a loop more than kLate after it was published
// makes the loops run on their callers alone for kSerialMin, doubling with every late helper in
// a row up to kSerialMax.  A caller spins for kWaitSpin on the claimed chunks before it blocks.
constexpr Clock::duration kIdleSpin = std::chrono::microseconds(100);
constexpr Clock::duration kPreempted = std::chrono::microseconds(100);
constexpr Clock::duration kBackoff = std::chrono::milliseconds(10);
constexpr Clock::duration kLate = std::chrono::microseconds(500);
constexpr Clock::duration kSerialMin = std::chrono::milliseconds(10);
constexpr int kSerialMaxDoublings = 7;  // kSerialMax = 1.28 s
constexpr Clock::duration kWaitSpin = std::chrono::microseconds(50);

// claim_loop_stats(): relaxed counters, each touched at most once per loop and thread.
std::atomic<int64_t> g_pooled_loops{0}, g_serial_loops{0}, g_helper_chunks{0}, g_helper_parks{0},
    g_helper_backoffs{0}, g_late_helpers{0}, g_caller_blocks{0};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until done() or for `limit`, whichever comes first; returns done().
template <typename Done>
bool spin_until(const Done& done, Clock::duration limit) {
  const Clock::time_point deadline = Clock::now() + limit;
  for (int i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if (i % 64 == 0 && Clock::now() >= deadline) return done();
  }
}

enum class Spin { caught, timed_out, preempted };

// A helper's wait for the next loop before it parks: spins until fresh() (caught) or for
// kIdleSpin, yielding the core every few microseconds; preempted if a yield let another thread
// run for longer than kPreempted.
template <typename Fresh>
Spin idle_spin(const Fresh& fresh) {
  Clock::time_point last = Clock::now();
  const Clock::time_point deadline = last + kIdleSpin;
  for (int i = 1;; ++i) {
    if (fresh()) return Spin::caught;
    cpu_relax();
    if (i % 64 == 0) {
      const Clock::time_point now = Clock::now();
      if (now - last > kPreempted) return Spin::preempted;
      if (now >= deadline) return Spin::timed_out;
      std::this_thread::yield();
      last = now;
    }
  }
}

// One loop over chunks [0, chunks) of body, split into one contiguous range per thread (the
// caller's first), as an OpenMP loop splits it.  A thread claims the chunks of its own range
// one at a time from the front, then those left in the others' ranges one at a time from the
// back: the range of a thread that has not started is taken over whole, and a claim touches
// only the claimer's cache line until two threads work on one range at the end.
struct Job {
  // A range [lo, hi) packed as lo << 32 | hi, and the chunks its owner has finished (its own or
  // taken from another range), on a cache line of its own.
  struct alignas(64) Slot {
    std::atomic<uint64_t> range{0};
    std::atomic<int64_t> done{0};
  };

  explicit Job(int threads) : slots(threads) {}

  // Sets up a loop (on a Job that no other thread holds).
  void start(int64_t chunks_, c10::function_ref<void(int64_t)> body_) {
    chunks = chunks_;
    body = body_;
    const int threads = static_cast<int>(slots.size());
    for (int t = 0; t < threads; ++t) {
      const uint64_t lo = chunks * t / threads, hi = chunks * (t + 1) / threads;
      slots[t].range.store(lo << 32 | hi, std::memory_order_relaxed);
      slots[t].done.store(0, std::memory_order_relaxed);
    }
    waiting.store(false, std::memory_order_relaxed);
    error = nullptr;
  }

  int64_t chunks = 0;
  c10::function_ref<void(int64_t)> body;  // valid until every claimed chunk has finished
  std::vector<Slot> slots;                // one per thread taking part
  std::atomic<int> holders{0};            // helpers that took the Job (under the pool's mutex)
  alignas(64) std::atomic<bool> waiting{false};  // the caller blocks on cv
  std::mutex mu;
  std::condition_variable cv;
  std::exception_ptr error;  // the first exception of body, under mu

  // Claims the first (front) or last chunk of a slot's range.
  static bool claim(Slot& slot, bool front, int64_t& chunk) {
    uint64_t r = slot.range.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = r >> 32, hi = r & 0xffffffffu;
      if (lo >= hi) return false;
      if (slot.range.compare_exchange_weak(r, front ? r + (uint64_t{1} << 32) : r - 1, std::memory_order_relaxed)) {
        chunk = static_cast<int64_t>(front ? lo : hi - 1);
        return true;
      }
    }
  }

  void run(int64_t chunk, Slot& mine) {
    try {
      body(chunk);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
    // seq_cst with the caller's store of `waiting` and loads of `done`: either the caller sees
    // this chunk finished, or this thread sees the caller waiting and wakes it.
    mine.done.fetch_add(1, std::memory_order_seq_cst);
    if (waiting.load(std::memory_order_seq_cst)) {
      { std::lock_guard<std::mutex> lock(mu); }
      cv.notify_one();
    }
  }

  // Thread t's part (0 the caller, t > 0 pool thread t - 1): claims and runs chunks until none
  // is left; returns how many it ran.
  int64_t work(int t) {
    const int n = static_cast<int>(slots.size());
    Slot& mine = slots[t];
    int64_t ran = 0, chunk;
    for (; claim(mine, true, chunk); ++ran) run(chunk, mine);
    for (int k = 1; k < n; ++k) {
      for (Slot& other = slots[(t + k) % n]; claim(other, false, chunk); ++ran) run(chunk, mine);
    }
    return ran;
  }

  bool all_done() const {
    int64_t done = 0;
    for (const Slot& slot : slots) done += slot.done.load(std::memory_order_seq_cst);
    return done == chunks;
  }

  // Returns once every chunk has finished (the caller, after work(0) found none left).
  void wait() {
    if (spin_until([this] { return all_done(); }, kWaitSpin)) return;
    g_caller_blocks.fetch_add(1, std::memory_order_relaxed);
    std::unique_lock<std::mutex> lock(mu);
    waiting.store(true, std::memory_order_seq_cst);
    cv.wait(lock, [this] { return all_done(); });
  }
};

class Pool {
 public:
  // Runs body over the chunks on the caller and up to `helpers` pool threads; false (nothing
  // run) when the pool is running another caller's loop or has no thread.
  bool run(int64_t chunks, int helpers, c10::function_ref<void(int64_t)> body) {
    // Helpers came late lately: run on the caller alone, waking nobody.
    if (Clock::now().time_since_epoch().count() < serial_until_.load(std::memory_order_relaxed)) {
      g_serial_loops.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    struct Release {
      std::atomic<bool>& busy;
      ~Release() { busy.store(false, std::memory_order_release); }
    } release{busy_};
    grow(helpers);
    helpers = std::min(helpers, threads_);
    if (helpers == 0) return false;
    Job* job = idle_job(helpers + 1);
    job->start(chunks, body);
    {
      std::lock_guard<std::mutex> lock(mu_);
      published_ = Clock::now();
      current_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    // Only the helpers this loop needs (each parks on its own condition variable; notifying one
    // with no waiter is no system call): waking the others would only put them back to sleep.
    for (int i = 0; i < helpers; ++i) parked_[i]->notify_one();
    job->work(0);
    job->wait();
    g_pooled_loops.fetch_add(1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = nullptr;  // no helper takes hold of the Job from now on
    }
    if (job->error) std::rethrow_exception(job->error);
    return true;
  }

 private:
  // Sets or clears the callers' backoff from a helper's delay in taking up a loop.
  // (Only the helpers write late_streak_; with several helpers the updates may interleave, which
  // only blurs the backoff.)
  void judge_latency(Clock::duration latency) {
    const int streak = late_streak_.load(std::memory_order_relaxed);
    if (latency <= kLate) {
      if (streak > 0) late_streak_.store(streak - 1, std::memory_order_relaxed);
      return;
    }
    g_late_helpers.fetch_add(1, std::memory_order_relaxed);
    late_streak_.store(std::min(streak + 1, kSerialMaxDoublings), std::memory_order_relaxed);
    const Clock::time_point until = Clock::now() + kSerialMin * (int64_t{1} << streak);
    serial_until_.store(until.time_since_epoch().count(), std::memory_order_relaxed);
  }

  // A Job for `threads` threads that no helper holds (a late one may still hold the last
  // loop's), reused from earlier loops where one is: the loops allocate nothing in the steady
  // state, and no helper frees memory (which glibc would keep in the helper's cache).
  Job* idle_job(int threads) {
    for (const auto& job : jobs_) {
      // acquire: a helper's accesses to the Job come before its release of it.
      if (static_cast<int>(job->slots.size()) == threads && job->holders.load(std::memory_order_acquire) == 0) {
        return job.get();
      }
    }
    return jobs_.emplace_back(std::make_unique<Job>(threads)).get();
  }

  // Starts threads up to `wanted` (only the caller that holds busy_ does).
  void grow(int wanted) {
    while (threads_ < wanted) {
      if (static_cast<int>(parked_.size()) == threads_) parked_.push_back(std::make_unique<std::condition_variable>());
      try {
        std::thread(&Pool::helper, this, threads_, parked_[threads_].get(), generation_.load(std::memory_order_relaxed))
            .detach();
      } catch (const std::exception&) {
        return;  // no more threads: the loops run on fewer
      }
      ++threads_;
    }
  }

  void helper(int index, std::condition_variable* parking, uint64_t seen) {
    c10::setThreadName("cvr_claim");
    const auto fresh = [this, &seen] { return generation_.load(std::memory_order_acquire) != seen; };
    bool spin = false;
    Clock::time_point spin_after{};  // no idle spin before then: spinning did not pay recently
    const auto back_off = [&spin_after] {
      spin_after = Clock::now() + kBackoff;
      g_helper_backoffs.fetch_add(1, std::memory_order_relaxed);
    };
    for (;;) {
      bool caught = false;  // spinning when the loop came
      if (spin && Clock::now() >= spin_after) {
        const Spin how = idle_spin(fresh);
        if (how == Spin::preempted) back_off();
        caught = how == Spin::caught;
      }
      Job* job;
      Clock::time_point published;
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (!fresh()) {
          g_helper_parks.fetch_add(1, std::memory_order_relaxed);
          parking->wait(lock, fresh);
        }
        job = current_;
        published = published_;
        seen = generation_.load(std::memory_order_relaxed);
        if (job != nullptr) job->holders.fetch_add(1, std::memory_order_relaxed);
      }
      judge_latency(Clock::now() - published);
      // A helper that was spinning when the loop came and still found no chunk left did not get
      // its core in time (a thread that does not yield, such as a spinning OpenMP worker, holds
      // it): it parks straight away for a while, and being woken lets it preempt that thread.
      int64_t ran = 0;
      if (job != nullptr) {
        spin = index + 1 < static_cast<int>(job->slots.size());  // a thread beyond the thread count parks at once
        if (spin) ran = job->work(index + 1);
        job->holders.fetch_sub(1, std::memory_order_release);
        g_helper_chunks.fetch_add(ran, std::memory_order_relaxed);
      }
      if (caught && ran == 0) back_off();
    }
  }

  std::atomic<bool> busy_{false};
  int threads_ = 0;  // started helpers, under busy_
  std::mutex mu_;
  std::vector<std::unique_ptr<std::condition_variable>> parked_;  // helper i parks on parked_[i]; under busy_
  std::atomic<uint64_t> generation_{0};  // loops published; written under mu_
  Job* current_ = nullptr;               // the loop running, under mu_
  Clock::time_point published_;          // when the last loop was published, under mu_
  std::vector<std::unique_ptr<Job>> jobs_;  // every Job made, under busy_
  std::atomic<Clock::rep> serial_until_{0};  // no loop publishes before then (Clock ticks)
  std::atomic<int> late_streak_{0};          // late helpers in a row
};

// The process's pool, started on first use and never destroyed: its threads are detached and
// may be parked on its condition variable when the process exits, so there is nothing to join
// at static destruction.  A child forked from a process with a pool has none of its threads
// (and perhaps a locked mutex of it): the fork handler makes the child start its own.
std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
#if !defined(_WIN32)
  static const bool registered = [] {
    return pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr, std::memory_order_relaxed); }) == 0;
  }();
  (void)registered;
#endif
  auto* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel, std::memory_order_acquire)) return *fresh;
  delete fresh;
  return *p;
}

void serial(int64_t chunks, c10::function_ref<void(int64_t)> body) {
  for (int64_t c = 0; c < chunks; ++c) body(c);
}

}  // namespace

void claim_loop(int64_t chunks, int64_t grain, c10::function_ref<void(int64_t)> body) {
  grain = std::max<int64_t>(grain, 1);
  const int threads = at::get_num_threads();
  // (A range packs two chunk indices into 32 bits each.)
  if (chunks <= grain || threads <= 1 || chunks > 0xffffffff || at::in_parallel_region()) {
    return serial(chunks, body);
  }
  const int64_t shares = (chunks + grain - 1) / grain;
  const int helpers = static_cast<int>(std::min<int64_t>(threads, shares)) - 1;
  if (!pool().run(chunks, helpers, body)) serial(chunks, body);
}

ClaimLoopStats claim_loop_stats() {
  return {g_pooled_loops.load(std::memory_order_relaxed),   g_serial_loops.load(std::memory_order_relaxed),
          g_helper_chunks.load(std::memory_order_relaxed),   g_helper_parks.load(std::memory_order_relaxed),
          g_helper_backoffs.load(std::memory_order_relaxed), g_late_helpers.load(std::memory_order_relaxed),
          g_caller_blocks.load(std::memory_order_relaxed)};
}

}  // namespace cvr::ops
