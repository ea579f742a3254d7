// The completion engine of the cuda backend: an await marks a point on the user's stream (an
// event record, nothing that holds the stream up), and aiocuda's own thread learns when the GPU
// has passed it and completes the awaits behind it. See engine.cpp for the data path.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "loader.hpp"
#include "queue.hpp"

namespace aiocuda::cuda {

// How the engine learns that a mark was passed.
enum class Strategy : int {
    kCallback = 0,  // a host function on an aiocuda stream that waits on the mark: no CPU while waiting
    kPoll = 1,      // a native thread queries the marks, spinning briefly then backing off: lowest latency
    kFlag = 2,      // the stream writes a word of host memory; a native thread reads it with plain
                    // loads, spinning only while a completion is due (the default)
};

struct Mark;  // a point on a stream, shared by the awaits behind it; what an aiocuda.Event holds

// Loop thread, GIL released. Each takes ownership of `n`: it completes later (or at once when
// no work can be pending), or is freed when the call is refused. Returns 0, a CUresult, or one
// of loader.hpp's refusals with `why` set. `device` < 0: take it from the stream (handles 0, 1
// and 2 then mean the current context's legacy or per-thread stream).
CUresult wait_stream(uintptr_t stream, int device, Node* n, std::string* why);
// As wait_stream, and `*mark` gets a reference to the mark (release it with mark_release).
CUresult record(uintptr_t stream, int device, Node* n, Mark** mark, std::string* why);
// A CUevent made by anyone (torch.cuda.Event), of device `device`: watched by aiocuda's thread.
CUresult wait_event(uintptr_t event, int device, Node* n, std::string* why);
// All the work queued so far on device `device` (cuCtxRecordEvent; a cuCtxSynchronize thread
// on drivers older than 12.5).
CUresult wait_device(int device, Node* n, std::string* why);
// What an await on `stream` (of `device`, as for wait_stream) would be refused for at once: no
// driver, no such device, a default stream of no context, a capture. Checked before a caller
// enqueues the work it would await (gpu_op's function), so a refused await leaves no work behind.
CUresult check_stream(uintptr_t stream, int device, std::string* why);

CUresult mark_query(Mark* m, std::string* why);        // 0 done, 600 not ready; never blocks
CUresult mark_synchronize(Mark* m, std::string* why);  // blocks: call without the GIL
void mark_release(Mark* m);

void set_strategy(Strategy s);
Strategy strategy();
void set_backstop_period_ms(int ms);
void set_keep_idle_ms(int ms);  // how long an idle stream's timeline is kept (1000 by default)
// Tests: park the engine between passes, standing for what cuda.h asks of code that resets a
// device ("it is responsibility of the calling function to ensure that no other module in the
// process is using the device any more").
void hold(bool on);
// A queue closes (mark_abandoned() first, then touches_begun()): waits, up to `bound`, for the
// placements begun by then that touch a user's stream, so that none touches it after its loop
// let the stream object go. Blocks: call without the GIL. False: one was still under way at the
// bound (an enqueue on a full stream blocks in the driver until the stream has room).
uint64_t touches_begun();
bool settle_touches(uint64_t before, std::chrono::milliseconds bound);
void after_fork_in_child();
// Tests: the next `n` native threads aiocuda would start fail to start, as when the system has
// none left (the awaits that needed them are refused with kNoThread, and nothing leaks).
void fail_thread_starts(int n);

struct Stats {
    size_t pending;            // awaits not completed yet
    size_t marks;              // marks in flight (placed, not passed)
    size_t events;             // events aiocuda created (pooled)
    size_t lanes;              // aiocuda streams the callback strategy watches on
    size_t threads;            // native threads aiocuda started
    size_t flag_words;         // words of host memory streams write their marks to
    size_t timelines;          // streams aiocuda keeps a timeline of (idle ones are dropped)
    size_t parked;             // of those, idle ones kept a while for an await after a pause
    size_t handed_over;        // marks with many awaits that host functions left to the engine
    size_t bells;              // kFlag's doorbell marks placed (long or late marks)
    size_t naps;               // kFlag: timed sleeps of the engine thread (its wake-ups)
};
Stats stats();

}  // namespace aiocuda::cuda
