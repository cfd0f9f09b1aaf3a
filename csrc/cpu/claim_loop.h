// A parallel loop over fixed chunks that never waits for a thread that has not started: the
// caller and a few pool threads claim chunks one at a time with atomic operations (each from
// its own contiguous range first, then what is left of the others'), and the caller waits only
// for chunks already claimed to finish.  On a machine whose cores are taken by other
// processes, a pool thread that the OS has not scheduled yet claims nothing and the caller
// computes everything itself; an OpenMP region (at::parallel_for) would instead wait at its
// end barrier for that thread's share, a scheduler slice (milliseconds) for microseconds of work.
//
// Which thread computes a chunk varies from call to call, so a result is deterministic only when
// each chunk's output depends on its index alone (the loss kernels' per-chunk partial sums,
// added in chunk order afterwards).
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace cvr::ops {

// Calls body(c) exactly once for every c in [0, chunks), and returns when all calls have
// returned.  Runs them all on the calling thread when chunks <= grain, with one thread
// (at::get_num_threads() == 1), inside a parallel region, while the pool runs another caller's
// loop, or for a while after pool threads came late (the cores are taken); otherwise with up to
// min(at::get_num_threads(), ceil(chunks / grain)) threads, the caller included.  An exception
// from body is rethrown (the first one) once every claimed chunk has finished.
void claim_loop(int64_t chunks, int64_t grain, c10::function_ref<void(int64_t)> body);

// Counters since the library was loaded, for tests and diagnosis: loops that ran on the pool,
// loops that ran on their callers alone because pool threads came late lately, chunks that pool
// threads computed, times a pool thread parked, times it stopped spinning because it did not
// get its core in time, times one took up a loop late, and times a caller blocked on claimed
// chunks.
struct ClaimLoopStats {
  int64_t pooled_loops, serial_loops, helper_chunks, helper_parks, helper_backoffs, late_helpers, caller_blocks;
};
ClaimLoopStats claim_loop_stats();

}  // namespace cvr::ops
