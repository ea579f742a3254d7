// The completion engine's own state and the functions its files share (not installed, not
// part of engine.hpp's interface). The files, each readable alone:
//   engine.cpp        the entry points (awaits, Events, strategies), relays for foreign events
//   marks.cpp         marks and timelines: references, completion in stream order, reaping;
//                     the lock let go (let_go): finished awaits pushed and threads woken after it
//   contexts.cpp      contexts (primary only), sticky errors and resets
//   placement.cpp     timelines of streams, the mark itself (a memory write or an event record)
//                     with its capture checks, and the placers of open marks
//   detection.cpp     the engine thread: reading flag words, host functions, queries, backstop
//   device_waits.cpp  whole-device waits (cuCtxRecordEvent, or a cuCtxSynchronize thread)
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "engine.hpp"
#include "spin.hpp"

namespace aiocuda::cuda {

using namespace drv;
using Clock = std::chrono::steady_clock;

// Marks in flight per timeline. Past it, awaits share the timeline's open mark, which the engine
// places once an earlier mark is passed: aiocuda never fills a user's stream (a full stream
// blocks whoever enqueues), and an open mark may over-wait, never under-wait.
constexpr int kMarksInFlight = 8;
constexpr size_t kLanesPerContext = 16;  // past it, timelines share lanes (and may over-wait)
// aiocuda's host functions launched and not yet run, per context (a lane's watch of an event
// mark: kCallback's marks, kFlag's doorbells). The driver's queue of them is finite, shared with
// NCCL's and torch's, and while it is full every launch of the context waits, on any stream,
// from any thread (cuda.h gives no number; a measurement found 57: NVIDIA developer forums,
// topic 220629; the emulator's default is 56): aiocuda must never fill it, or the user's own
// launches and every await on the device wait. So it takes at most a little over half. Past
// the bound a mark is left to the backstop's queries, and a late timeline naps instead of ringing.
constexpr size_t kHostFnsPerContext = 32;
constexpr size_t kRelays = 16;           // streams per context that foreign events are read on
constexpr size_t kRelayWaits = 256;      // waits queued on one relay at most
constexpr size_t kPooledEvents = 64;     // idle events kept per context
constexpr unsigned kEventFlags = CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC;
// Poll strategy: spin this long after the last progress, then sleep, backing off to kPollMaxSleep.
constexpr auto kPollSpin = std::chrono::microseconds(2000);
constexpr auto kPollMaxSleep = std::chrono::microseconds(200);

// kFlag: how the engine thread waits for a word to change. It sleeps until a little before the
// timeline's next completion is expected (its own history: kFlagLead before it, and earlier for
// longer waits), spins from then until kFlagSpin past the expected time, then naps, for longer
// the later the completion is (at most kFlagMaxNap): a long wait costs a few hundred wake-ups a
// second, and no driver call (io_uring's hybrid polling sleeps through part of the expected time
// in the same way).
constexpr auto kFlagLead = std::chrono::microseconds(20);
constexpr auto kFlagSpin = std::chrono::microseconds(150);
constexpr int kSpinReads = 64;  // reads of the due words (a pause each) per look at the clock
constexpr auto kFlagMaxNap = std::chrono::microseconds(2000);
// kFlag's doorbell: when the engine thread would sleep kBellSleep or more before looking at a
// timeline's word (a long mark: its estimate may be wrong either way), or its oldest mark is
// kBellLate overdue (napping on would cost wake-ups for as long as it lasts), the placer puts an
// event mark (no awaits of its own) at the end of the stream, watched by a lane's host function
// as the callback strategy's are: the GPU then tells the engine, and its host function completes
// every earlier mark. One per timeline at a time, never one per await. It may over-wait (work
// enqueued after the late mark is before it), so the thread still looks, seldom: naps of a
// quarter of the lateness, at most kBellMaxNap.
constexpr auto kBellSleep = std::chrono::microseconds(1000);
constexpr auto kBellLate = std::chrono::microseconds(500);
constexpr auto kBellMaxNap = std::chrono::milliseconds(20);
constexpr auto kBellMargin = std::chrono::microseconds(200);  // spin this early at most, with one
constexpr size_t kFlagWordStride = 64;  // one cache line per timeline: the device writes whole lines
constexpr size_t kFlagPage = 4096;

struct CtxState;
struct Timeline;

// Who holds a reference to a mark (refs), and when it is released:
//   - its timeline, from its making until reap() pops it (passed, failed or retired);
//   - each aiocuda.Event made on it, until mark_release();
//   - a lane's watch (kCallback: placed, host function pending), until on_host_fn or unwatch();
//   - the engine while it queries the mark's event outside the lock, for that query only.
// The last unref() frees it and returns its event to the pool. A timeline pops a finished mark
// whoever else still holds it, so a watch that a held lane delays never holds up the timeline.
struct Mark {
    CUevent ev = nullptr;     // null until placed, and for flag marks
    Timeline* tl;
    Node* head = nullptr;     // the awaits behind it, linked through Node::next until completed
    Node* tail = nullptr;
    size_t waiters = 0;
    int refs = 1;             // the timeline's, one per aiocuda.Event, one per lane watch
    bool placed = false;
    bool done = false;
    bool owned = true;        // ev is from the pool (false: a foreign event, never re-pooled)
    bool watched = false;     // a lane's host function has yet to report it
    CUresult status = CUDA_SUCCESS;
    CUresult fail = CUDA_SUCCESS;  // could not be placed: fails with this once earlier marks end
    uint64_t key = 0;         // what its host function gets: never a pointer
    bool flag = false;        // kFlag: passed once its timeline's word reaches seq
    bool bell = false;        // kFlag's doorbell: an event mark with no awaits of its own
    uint32_t seq = 0;
    Clock::time_point at{};   // when it was placed (kFlag: the timeline's history)
    Mark* next = nullptr;     // in its timeline, oldest first
    struct Engine* owner;     // a forked child has a new engine and ignores the old one's
};

struct Lane {
    CUstream s;
    int users = 0;
    bool dead = false;  // its stream could not be made: out of its context's list, freed unused
};

// Marks in the order they complete: on one stream, on one context (device waits), or one foreign
// event.
struct Timeline {
    enum Kind : uint8_t { kStream, kDevice, kForeign } kind;
    CtxState* cs;
    CUstream stream = nullptr;   // kStream
    Mark* head = nullptr;        // placed marks, oldest first
    Mark* tail = nullptr;
    int in_flight = 0;           // marks in the list: passed ones leave once no watch holds them
    Mark* open = nullptr;        // unplaced: awaits waiting for room
    int alive = 0;               // marks pointing here (a foreign wait's timeline dies with them)
    bool placing = false;        // queued for its device's placer
    Mark* taken = nullptr;       // the open mark the placer is putting: after head, before open
    Lane* lane = nullptr;        // kCallback: where its marks are watched
    int watching = 0;            // its host functions not run yet
    bool active = false;         // in the engine's list
    bool parked = false;         // in Engine::parked: idle since idle_since (sweep_parked())
    Clock::time_point idle_since{};
    bool relay = false;          // an aiocuda stream that foreign events are read on
    unsigned long long sid = 0;  // kStream: cuStreamGetId, its key in Engine::streams
    int users = 0;               // threads between timeline_of and release_timeline
    // kFlag: the word of host memory its stream writes each mark's sequence number to.
    uint32_t* word = nullptr;
    CUdeviceptr dword = 0;
    uint32_t issued = 0;         // the last sequence number written (under record_mu)
    bool no_flag = false;        // the driver cannot write host memory from this stream: events
    int64_t est_ns = 0;          // how long its marks take, placed to passed (kFlag's sleeps)
    int64_t spread_ns = 0;       // how far from est_ns they end, on average (learn())
    Clock::time_point looked{};  // kFlag: its word was last seen short of its oldest mark then
    bool bell = false;           // kFlag: a doorbell mark is placed, or queued for the placer
    bool ringing = false;        // the placer is putting a doorbell on the stream: its flag marks
                                 // pass once it is done (their awaits' end lets the program
                                 // destroy the stream)
    std::mutex record_mu;        // marks enter the timeline in the order they enter the stream

    // The placer is putting a mark on the stream (the open one it took, or a doorbell).
    bool placing_now() const { return taken != nullptr || ringing; }
};

// One CUDA context instance (a reset makes a new one: a new cuCtxGetId).
struct CtxState {
    CUcontext ctx;
    unsigned long long id;
    int device = -1;
    bool primary = false;
    bool retired = false;        // reset or broken: its handles are never touched again
    CUresult error = CUDA_SUCCESS;
    std::vector<CUevent> pool;   // idle events (at most kPooledEvents; give_back())
    std::vector<CUevent> doomed; // past that: destroyed by the engine thread (a host function,
                                 // which may free a mark, must make no CUDA call)
    Timeline* legacy_tl = nullptr;
    Timeline* device_tl = nullptr;
    std::vector<Timeline*> relays;  // wait_event's streams (at most kRelays)
    std::vector<Lane*> lanes;
    size_t hostfns = 0;          // launched on its lanes, not yet run (kHostFnsPerContext)
    struct Placer* placer = nullptr;
    // kFlag: free words of registered host memory (their pages are never unregistered: a stream
    // may still write a word after its timeline has gone, and a reset forgets them anyway).
    std::vector<std::pair<uint32_t*, CUdeviceptr>> words;
    bool no_words = false;       // registration failed: this context marks with events
    CUstream probe = nullptr;    // kFlag's backstop: cuStreamQuery of it reports sticky errors
};

// Places open marks and doorbells for one device, on threads of their own, because placing is an
// enqueue on a user's stream, which blocks while that stream is full: the engine thread must
// never wait on that. Each thread takes one timeline at a time. Work that waited kPlacerStuck
// with no thread idle (each in an enqueue that blocks, on a full stream its user holds) gets
// another thread from the engine (spare_placers(), at most kPlacersPerDevice): the other
// streams' marks are placed meanwhile (invariant 18), for up to kPlacersPerDevice - 1 such
// streams at once.
constexpr int kPlacersPerDevice = 8;
constexpr auto kPlacerStuck = std::chrono::milliseconds(1);
constexpr auto kCaptureRetry = std::chrono::milliseconds(1);
struct Placer {
    std::condition_variable cv;  // under eng->mu
    bool wake = false;           // in Engine::wake_placers
    std::vector<Timeline*> queue;
    std::vector<Timeline*> bells;  // kFlag: timelines that want a doorbell mark
    // Timelines whose open mark waits for a capture on their stream to end, each with the
    // placer's reference: retried every kCaptureRetry by whichever of the device's threads is
    // free (not by the thread that found the capture, which may be held in an enqueue on another
    // stream meanwhile), and counted as waiting work by spare_placers().
    std::vector<Timeline*> capturing;
    int threads = 0;             // its threads (placer_run)
    int idle = 0;                // of those, waiting for work
    std::chrono::steady_clock::time_point waiting_since{};  // the work queued: since when ({}: none)
};

// Whole-device waits on drivers without cuCtxRecordEvent (older than 12.5): one thread per device
// calls cuCtxSynchronize, serving every waiter that arrived before it started. It spins while it
// waits (CU_CTX_SCHED_AUTO): the cost of an old driver.
struct DeviceWaiter {
    CUcontext ctx;
    std::mutex mu;
    std::condition_variable cv;
    // Each wait with the context instance (cuCtxGetId) it was asked in: a reset ends the wait
    // with an error, never with a success from the next instance's cuCtxSynchronize.
    std::vector<std::pair<Node*, unsigned long long>> waiting;
};

// Heap-allocated and never destroyed: its threads wait on its condition variables until the
// process ends, and a forked child starts a new one instead.
struct Engine {
    std::mutex mu;
    std::condition_variable cv;          // the engine thread waits here
    std::condition_variable placed_cv;   // mark_synchronize waits here for an open mark's placing
    std::vector<CtxState*> ctxs;         // live and retired (retired ones are leaked: rare)
    std::vector<Timeline*> active;       // timelines with marks or waiters
    std::vector<Timeline*> parked;       // idle stream timelines nothing refers to (park())
    // Streams' timelines by cuStreamGetId, of every context: an id is "unique for the life of the
    // program" (cuda.h), so an await on a known stream finds its timeline with no context lookup.
    std::unordered_map<unsigned long long, Timeline*> streams;
    std::vector<Mark*> to_watch;         // kCallback: placed, not watched yet
    std::vector<Mark*> seen;             // passed, as host functions said: too many for them
    // Awaits finished under the lock, in the order they finished, linked through Node::next: they
    // are pushed to their loops' queues after it is let go (Locked, let_go), by one thread
    // at a time, so that they reach each queue in that order whoever pushes them.
    Node* finished = nullptr;
    Node** finished_tail = &finished;
    bool pushing = false;                // a thread is pushing finished awaits (the lock let go)
    // Wake-ups asked for under the lock, made once it is let go (let_go): a thread woken while its
    // waker holds the lock can preempt the waker there, and every await then waits for the lock.
    bool wake_engine = false;
    std::vector<Placer*> wake_placers;
    size_t handed_over = 0;              // marks host functions left to this thread (tests)
    size_t bells = 0;                    // kFlag's doorbell marks placed (tests)
    size_t naps = 0;                     // kFlag: timed sleeps of the engine thread (tests)
    std::vector<Mark*> slots;            // host-function keys: (generation << 32) | index
    std::vector<uint32_t> gens;
    std::vector<uint32_t> free_slots;
    size_t pending = 0, marks = 0, events = 0, lanes = 0, threads = 0, words = 0, timelines = 0;
    int sync_waiters = 0;                // threads in mark_synchronize (placed_cv)
    Clock::time_point sleep_until{};     // the engine thread's wake-up, while it sleeps
    int64_t oversleep_ns = 0;            // kFlag: how late a timed sleep ends on this machine
    bool started = false;
    bool sleeping = false;               // the engine thread waits on cv
    bool kick = false;                   // something for the engine to do (an open mark has room)
    std::atomic<uint32_t> poke{0};       // bumped with every kick or new mark: ends a lock-free spin
    bool held = false, in_pass = false;  // hold(): tests
    int placing = 0;                     // placers at work
    std::condition_variable hold_cv;
    // Placements that found someone waiting and so touch a user's stream (begin_touch()): by
    // ticket, so that a closing queue waits for the ones begun before it (settle_touches()).
    uint64_t touch_tickets = 0;
    std::vector<uint64_t> touching;
    std::condition_variable touch_cv;
    std::vector<CUcontext> primary;      // by device, retained once when found active
    std::vector<DeviceWaiter*> device_waiters;
    std::vector<Placer*> placers;        // by device
    // The engine thread's scratch space, reused from pass to pass (members, because the engine
    // outlives static destructors: its thread runs until the process ends).
    std::vector<Timeline*> tls;
    std::vector<CtxState*> pass_ctxs;
    std::vector<Mark*> queried;
};

void on_host_fn(void* key);

// Under eng->mu, on a placer thread, once it found that someone waits for what it is about to put
// on a user's stream: from here until end_touch() it may touch that stream. A queue that closes
// (its loop's stream objects may go next) waits for such touches begun before it.
void begin_touch();
void end_touch();  // takes eng->mu; a no-op if begin_touch() was not called

extern Engine* eng;

// Under eng->mu (held by `g`): pushes the awaits finished so far to their queues, and makes the
// wake-ups asked for, with the lock let go; the pushes unless another thread is pushing (it takes
// these too before it stops). Returns whether the lock was let go meanwhile; `leave`: returns with
// it let go. A queue push can write an eventfd, a system call, and a wake-up can hand the CPU to
// the woken thread: neither is done under the lock that every await takes.
bool let_go(std::unique_lock<std::mutex>& g, bool leave);

// eng->mu for a short section (taken spinning: spin_lock), and what it finished and woke, after.
class Locked {
public:
    Locked() : g_(eng->mu, std::defer_lock) { spin_lock(g_); }
    ~Locked() { let_go(g_, true); }
    Locked(const Locked&) = delete;
    Locked& operator=(const Locked&) = delete;

private:
    std::unique_lock<std::mutex> g_;
};
extern std::atomic<int> g_fail_starts;  // tests: thread starts still to fail (fail_thread_starts)

// Starts a detached thread running fn(args...); false if the system could not start one
// (std::thread's std::system_error, or a failure fail_thread_starts() asked for).
template <class F, class... A>
bool start_thread(F fn, A... args) {
    if (take_one(g_fail_starts)) return false;
    try {
        std::thread(fn, args...).detach();
        return true;
    } catch (const std::system_error&) {
        return false;
    }
}

extern std::atomic<int> g_backstop_ms;
extern std::atomic<int> g_keep_idle_ms;  // kept: how long a parked timeline is
Strategy current_strategy();

constexpr uintptr_t kLegacyHandle = 1, kPerThreadHandle = 2;  // CU_STREAM_LEGACY, CU_STREAM_PER_THREAD
inline bool is_legacy(uintptr_t stream) { return stream <= kLegacyHandle; }  // 0 means it too

// Runs `fn` with `ctx` current on this thread, restoring the previous context after.
template <class F>
CUresult with_ctx(CUcontext ctx, F fn) {
    CUcontext cur = nullptr;
    CUresult r = api.cuCtxGetCurrent(&cur);
    if (r != CUDA_SUCCESS) return r;
    bool push = cur != ctx;
    if (push && (r = api.cuCtxPushCurrent(ctx)) != CUDA_SUCCESS) return r;
    r = fn();
    if (push) {
        CUcontext popped;
        api.cuCtxPopCurrent(&popped);
    }
    return r;
}

// Runs `fn`, a call made on a thread that may capture (the loop's, or a user thread asking an
// Event; placers too, which never capture), in relaxed capture mode
// (cuThreadExchangeStreamCaptureMode: "CU_STREAM_CAPTURE_MODE_RELAXED: The local thread is not
// prohibited from potentially unsafe API calls"). In the default global mode, a query or a host
// registration made while another thread captures (pytorch#104555), or while this thread does (a
// task holding a capture open across an await: "If the local thread has an ongoing capture
// sequence not initiated with CU_STREAM_CAPTURE_MODE_RELAXED, it is prohibited", which
// thread-local mode keeps), would be prohibited and invalidate that capture. What such calls
// touch is never part of a capture: aiocuda checks (CUDA_ERROR_CAPTURED_EVENT stays an error).
template <class F>
CUresult relaxed_mode(F fn) {
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    CUresult r = api.cuThreadExchangeStreamCaptureMode(&mode);
    if (r != CUDA_SUCCESS) return r;
    r = fn();
    api.cuThreadExchangeStreamCaptureMode(&mode);
    return r;
}

// marks.cpp (under eng->mu unless said)
void discard(Node* n);
Mark* slot_get(uint64_t key);
Mark* new_mark(Timeline* tl);
void unref(Mark* m);
void attach(Mark* m, Node* n);
void finish(Mark* m, CUresult status);
bool activate(Timeline* tl);
void watch(Mark* m);
void unwatch(Mark* m);
void placed(Timeline* tl, Mark* m, CUevent ev);
void reap(Timeline* tl);
bool idle(Timeline* tl);
// Whether anyone still waits for the unplaced or flag mark `m`: an await whose loop is open, or
// an aiocuda.Event. A loop that closed with awaits pending let go of their stream objects, which
// may have destroyed their stream since (CuPy's does when collected): for such awaits alone the
// placer puts nothing more on the stream (no open mark, no doorbell).
bool wanted(const Mark* m);
void passed(Mark* m, CUresult status);
void give_back(CtxState* cs, CUevent ev);  // an idle event of a live context: pooled or doomed
// contexts.cpp
void retire(CtxState* cs, CUresult code);
bool still_current(CtxState* cs);  // takes eng->mu when retiring
CUresult primary_of(int device, CUcontext* out);
bool primary_inactive(int device, CUresult r);  // r says device's primary context was reset
CUresult check_device(int device, std::string* why);
CUresult ctx_state(CUcontext ctx, CtxState** out, std::string* why);
CUresult stream_ctx(uintptr_t stream, int device, CtxState** cs, std::string* why);
// placement.cpp
CUresult timeline_of(CtxState* cs, Timeline::Kind kind, uintptr_t stream, Timeline** out,
                     unsigned long long sid = 0);
void release_timeline(Timeline* tl);
void park(Timeline* tl);
Clock::time_point sweep_parked(Clock::time_point now);
CUresult take_event(CtxState* cs, CUevent* ev);
CUresult mark(Timeline* tl, Node* n, Mark** user, std::string* why, bool checked = false);
bool join_open(Timeline* tl, Node* n, Mark** user, CUresult* res);
CUresult place_or_join(Timeline* tl, Node* n, Mark** user, std::string* why);
CUresult refuse_capturing(CUresult r, CUstreamCaptureStatus st, std::string* why);
void want_placing(Timeline* tl);
void want_bell(Timeline* tl);
void spare_placers(Clock::time_point now);
bool start_placer(int dev);  // false: no thread could be started
// detection.cpp
bool start_engine_locked();  // false: no thread could be started
void wake_locked();
void nudge_locked(Timeline* tl);
void on_host_fn(void* key);  // the driver's callback thread: native memory only

}  // namespace aiocuda::cuda
