// The completion engine. The data path, one await on a CUDA stream:
//
//   loop thread (GIL released)  wait_stream: stream -> its context's state -> the stream's
//                               timeline; cuStreamIsCapturing; then either a mark (the one operation
//                               put on the user's stream: kFlag, cuStreamWriteValue32 of the
//                               timeline's next sequence number into a word of host memory; else a
//                               cuEventRecord of a pooled event), a second cuStreamIsCapturing (a
//                               capture may begin between the check and the mark), or, past
//                               kMarksInFlight, a place on the timeline's open mark
//   engine thread               learns that marks were passed (kFlag: a plain load of each
//                               timeline's word, spinning only while a completion is due, sleeping
//                               otherwise; kPoll: cuEventQuery; kCallback: a host function on an
//                               aiocuda "lane" stream that waits on the mark), places open marks
//                               when room frees up, and checks contexts for sticky errors and resets
//   completion                  every await behind a passed mark (and behind every earlier mark
//                               of its timeline: stream order) is pushed to its loop's queue
//
// Nothing aiocuda puts on a user's stream holds it up (an event record or a memory write never
// blocks later work); host functions, stream waits, queries and synchronizes happen only on
// aiocuda's own threads and streams, which run in thread-local capture mode, so a user's
// global-mode capture elsewhere stays valid. What aiocuda holds is bounded by the streams it
// watches, not by the awaits.
#include "engine.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <tuple>
#include <thread>
#include <unordered_map>
#include <vector>

#include "spin.hpp"

#ifdef __linux__
#include <sys/prctl.h>
#endif

namespace aiocuda::cuda {

using namespace drv;
using Clock = std::chrono::steady_clock;

// Marks in flight per timeline. Past it, awaits share the timeline's open mark, which the engine
// places once an earlier mark is passed: aiocuda never fills a user's stream (a full stream
// blocks whoever enqueues), and an open mark may over-wait, never under-wait.
constexpr int kMarksInFlight = 8;
constexpr size_t kLanesPerContext = 16;  // past it, timelines share lanes (and may over-wait)
constexpr size_t kRelays = 16;           // streams per context that foreign events are read on
constexpr size_t kRelayWaits = 256;      // waits queued on one relay at most
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
constexpr auto kFlagLead = std::chrono::microseconds(40);
constexpr auto kFlagSpin = std::chrono::microseconds(150);
constexpr auto kFlagMaxNap = std::chrono::microseconds(2000);
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
    Lane* lane = nullptr;        // kCallback: where its marks are watched
    int watching = 0;            // its host functions not run yet
    bool active = false;         // in the engine's list
    bool relay = false;          // an aiocuda stream that foreign events are read on
    unsigned long long sid = 0;  // kStream: cuStreamGetId, its key in CtxState::streams
    int users = 0;               // threads between timeline_of and release_timeline
    // kFlag: the word of host memory its stream writes each mark's sequence number to.
    uint32_t* word = nullptr;
    CUdeviceptr dword = 0;
    uint32_t issued = 0;         // the last sequence number written (under record_mu)
    bool no_flag = false;        // the driver cannot write host memory from this stream: events
    int64_t est_ns = 0;          // how long its marks take, placed to passed (kFlag's sleeps)
    std::mutex record_mu;        // marks enter the timeline in the order they enter the stream
};

// One CUDA context instance (a reset makes a new one: a new cuCtxGetId).
struct CtxState {
    CUcontext ctx;
    unsigned long long id;
    int device = -1;
    bool primary = false;
    bool retired = false;        // reset or broken: its handles are never touched again
    CUresult error = CUDA_SUCCESS;
    std::vector<CUevent> pool;   // idle events
    std::unordered_map<unsigned long long, Timeline*> streams;  // by cuStreamGetId
    Timeline* legacy_tl = nullptr;
    Timeline* device_tl = nullptr;
    std::vector<Timeline*> relays;  // wait_event's streams (at most kRelays)
    std::vector<Lane*> lanes;
    struct Placer* placer = nullptr;
    // kFlag: free words of registered host memory (their pages are never unregistered: a stream
    // may still write a word after its timeline has gone, and a reset forgets them anyway).
    std::vector<std::pair<uint32_t*, CUdeviceptr>> words;
    bool no_words = false;       // registration failed: this context marks with events
    CUstream probe = nullptr;    // kFlag's backstop: cuStreamQuery of it reports sticky errors
};

// Places open marks for one device. Its own thread, because placing is an enqueue on a user's
// stream, which blocks while that stream is full: the engine thread must never wait on that.
struct Placer {
    std::condition_variable cv;  // under eng->mu
    std::vector<Timeline*> queue;
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
    std::vector<Mark*> to_watch;         // kCallback: placed, not watched yet
    std::vector<Mark*> slots;            // host-function keys: (generation << 32) | index
    std::vector<uint32_t> gens;
    std::vector<uint32_t> free_slots;
    size_t pending = 0, marks = 0, events = 0, lanes = 0, threads = 0, words = 0, timelines = 0;
    int sync_waiters = 0;                // threads in mark_synchronize (placed_cv)
    Clock::time_point sleep_until{};     // the engine thread's wake-up, while it sleeps
    Clock::time_point last_look{};       // kFlag: when read_flags last read the words
    bool started = false;
    bool sleeping = false;               // the engine thread waits on cv
    bool kick = false;                   // something for the engine to do (an open mark has room)
    bool held = false, in_pass = false;  // hold(): tests
    int placing = 0;                     // placers at work
    std::condition_variable hold_cv;
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

namespace {

Engine* eng = new Engine;
std::atomic<int> g_strategy{-1};  // -1: not chosen yet (AIOCUDA_STRATEGY, else kFlag)
std::atomic<int> g_backstop_ms{20};

Strategy current_strategy() {
    int s = g_strategy.load(std::memory_order_relaxed);
    if (s < 0) {
        const char* e = std::getenv("AIOCUDA_STRATEGY");
        s = !e ? 2 : std::strcmp(e, "poll") == 0 ? 1 : std::strcmp(e, "callback") == 0 ? 0 : 2;
        g_strategy.store(s, std::memory_order_relaxed);
    }
    return static_cast<Strategy>(s);
}

void discard(Node* n) {
    Queue* q = n->queue;
    free_node(n);
    q->release();
}

// Completes a list of nodes linked through Node::next (read before each push: the push relinks).
void complete_list(Node* n, CUresult status) {
    while (n) {
        Node* next = n->next;
        complete(n, status);
        n = next;
    }
}


// ---- marks and timelines (under eng->mu) -------------------------------------------------------

uint64_t slot_add(Mark* m) {
    uint32_t i;
    if (!eng->free_slots.empty()) {
        i = eng->free_slots.back();
        eng->free_slots.pop_back();
    } else {
        i = static_cast<uint32_t>(eng->slots.size());
        eng->slots.push_back(nullptr);
        eng->gens.push_back(1);
    }
    eng->slots[i] = m;
    return (static_cast<uint64_t>(eng->gens[i]) << 32) | i;
}

Mark* slot_get(uint64_t key) {
    uint32_t i = static_cast<uint32_t>(key);
    if (i >= eng->slots.size() || eng->gens[i] != static_cast<uint32_t>(key >> 32)) return nullptr;
    return eng->slots[i];
}

Mark* new_mark(Timeline* tl) {
    Mark* m = new Mark;
    m->tl = tl;
    ++tl->alive;
    m->owner = eng;
    m->key = slot_add(m);
    return m;
}

void unref(Mark* m) {
    if (--m->refs > 0) return;
    uint32_t i = static_cast<uint32_t>(m->key);
    eng->slots[i] = nullptr;
    if (++eng->gens[i] == 0) eng->gens[i] = 1;
    eng->free_slots.push_back(i);
    // Only an event of a live context goes back to the pool: a reset destroyed the others.
    Timeline* tl = m->tl;
    if (m->ev && m->owned && !tl->cs->retired) tl->cs->pool.push_back(m->ev);
    delete m;
    if (--tl->alive == 0 && tl->kind == Timeline::kForeign && !tl->active)
        delete tl;  // a foreign wait's timeline lives as long as its one mark
}

void attach(Mark* m, Node* n) {
    n->next = nullptr;
    if (m->tail) m->tail->next = n; else m->head = n;
    m->tail = n;
    ++m->waiters;
    ++eng->pending;
}

void finish(Mark* m, CUresult status) {
    if (m->done) return;
    m->done = true;
    m->status = status;
    if (m->placed) --eng->marks;
    // Pushed under the engine's lock, so that completions reach each queue in stream order
    // whichever thread learns of them (a host function and a query can race).
    complete_list(m->head, status);
    eng->pending -= m->waiters;
    m->head = m->tail = nullptr;
    m->waiters = 0;
    if (eng->sync_waiters) eng->placed_cv.notify_all();
}

// Returns whether the engine had nothing to watch before.
bool activate(Timeline* tl) {
    if (tl->active) return false;
    tl->active = true;
    eng->active.push_back(tl);
    return eng->active.size() == 1;
}

// Hands `m` to the engine for a lane's host function. The mark stays in its timeline (and counts
// against kMarksInFlight, its event out of the pool) until that host function has run.
void watch(Mark* m) {
    ++m->refs;  // the watch's: the host function may run after the mark was finished
    m->watched = true;
    eng->to_watch.push_back(m);
    eng->kick = true;
}

void unwatch(Mark* m) {
    m->watched = false;
    unref(m);
}

void want_placing(Timeline* tl);
void start_placer(int dev);

// `m` now stands at the end of `tl`'s work as event `ev`: watched from here on.
void placed(Timeline* tl, Mark* m, CUevent ev) {
    m->ev = ev;
    m->placed = true;
    ++eng->marks;
    if (tl->tail) tl->tail->next = m; else tl->head = m;
    tl->tail = m;
    ++tl->in_flight;
    m->at = Clock::now();
    // Event marks: a lane's host function, unless polling (kFlag watches device waits this way).
    if (!m->flag && current_strategy() != Strategy::kPoll) watch(m);
    eng->placed_cv.notify_all();
}

// Pops passed marks off the front of `tl`; returns its lane once nothing is watched there.
void reap(Timeline* tl) {
    bool freed = false;
    while (Mark* m = tl->head) {
        if (!m->done && m->fail != CUDA_SUCCESS) {  // every earlier mark has ended: now it fails
            finish(m, m->fail);
            eng->placed_cv.notify_all();
        }
        // A finished mark leaves even while a lane still watches it (the watch holds a reference):
        // a lane that a held stream delays never holds up this timeline's later marks.
        if (!m->done) break;
        tl->head = m->next;
        if (!tl->head) tl->tail = nullptr;
        if (m->placed) --tl->in_flight;
        unref(m);
        freed = true;
    }
    if (tl->lane && tl->watching == 0) {
        Lane* lane = tl->lane;
        tl->lane = nullptr;
        if (--lane->users == 0 && lane->dead) delete lane;
    }
    if (freed) want_placing(tl);
}

bool idle(Timeline* tl) { return !tl->head && !tl->open && !tl->lane; }

// Every earlier mark of a timeline completes with a passed one: work on a stream is ordered.
void passed(Mark* m, CUresult status) {
    if (m->done) return;  // whoever finished it finished every earlier mark too
    Timeline* tl = m->tl;
    if (tl->kind != Timeline::kForeign)
        for (Mark* p = tl->head; p && p != m; p = p->next) finish(p, p->fail ? p->fail : status);
    finish(m, status);
}

// Reset or broken: fail every await of the context and never touch its handles again.
void retire(CtxState* cs, CUresult code) {
    if (cs->retired) return;
    cs->retired = true;
    cs->error = code;
    for (Timeline* tl : eng->active) {
        if (tl->cs != cs) continue;
        for (Mark* m = tl->head; m; m = m->next) finish(m, code);
        if (tl->open) finish(tl->open, code);
    }
    eng->to_watch.erase(std::remove_if(eng->to_watch.begin(), eng->to_watch.end(),
                                       [&](Mark* m) {
                                           if (m->tl->cs != cs) return false;
                                           unwatch(m);
                                           return true;
                                       }),
                        eng->to_watch.end());
    eng->placed_cv.notify_all();
}

// Whether `cs` is still the context instance it was made for; if not (a reset gave the context a
// new cuCtxGetId), retires it before any of its handles is touched. Takes eng->mu when retiring.
bool still_current(CtxState* cs) {
    unsigned long long id = 0;
    CUresult r = api.cuCtxGetId(cs->ctx, &id);
    if (r == CUDA_SUCCESS && id == cs->id) return true;
    std::lock_guard<std::mutex> g(eng->mu);
    retire(cs, r != CUDA_SUCCESS ? r : CUDA_ERROR_CONTEXT_IS_DESTROYED);
    return false;
}

// ---- contexts ----------------------------------------------------------------------------------

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

// Runs `fn` in thread-local capture mode: a query made while another thread captures in global
// mode would otherwise be a prohibited call that invalidates that capture (pytorch#104555).
template <class F>
CUresult thread_local_mode(F fn) {
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    CUresult r = api.cuThreadExchangeStreamCaptureMode(&mode);
    if (r != CUDA_SUCCESS) return r;
    r = fn();
    api.cuThreadExchangeStreamCaptureMode(&mode);
    return r;
}

// Device `device`'s primary context if it is active, retained once; null if it is not (retaining
// an inactive one would create it, which aiocuda never does as a side effect).
CUresult primary_of(int device, CUcontext* out) {
    {
        std::lock_guard<std::mutex> g(eng->mu);
        if (static_cast<size_t>(device) < eng->primary.size() && eng->primary[device]) {
            *out = eng->primary[device];
            return CUDA_SUCCESS;
        }
    }
    unsigned flags = 0;
    int active = 0;
    CUdevice dev = 0;
    CUresult r = api.cuDeviceGet(&dev, device);
    if (r == CUDA_SUCCESS) r = api.cuDevicePrimaryCtxGetState(dev, &flags, &active);
    if (r != CUDA_SUCCESS || !active) {
        *out = nullptr;
        return r;
    }
    CUcontext p = nullptr;
    if ((r = api.cuDevicePrimaryCtxRetain(&p, dev)) != CUDA_SUCCESS) return r;
    std::lock_guard<std::mutex> g(eng->mu);
    if (eng->primary.size() <= static_cast<size_t>(device)) eng->primary.resize(device + 1, nullptr);
    if (!eng->primary[device]) eng->primary[device] = p;  // a racing retain is one more reference
    *out = eng->primary[device];
    return CUDA_SUCCESS;
}

CUresult check_device(int device, std::string* why) {
    int count = load().device_count;
    if (device >= 0 && device < count) return CUDA_SUCCESS;
    *why = "no CUDA device " + std::to_string(device) + ": this machine has " +
           std::to_string(count) + " (valid ordinals are 0 to " + std::to_string(count - 1) + ")";
    return CUDA_ERROR_INVALID_DEVICE;
}

const char* const kNotPrimaryText =
    "the stream belongs to a CUDA context that is not a device's primary context; aiocuda "
    "supports primary contexts only (the ones PyTorch and TensorFlow use)";

// The state of context `ctx`, made on first use. A new cuCtxGetId means the context was reset:
// the old state is retired and its awaits fail. A broken context returns its sticky error.
CUresult ctx_state(CUcontext ctx, CtxState** out, std::string* why) {
    unsigned long long id = 0;
    CUresult r = api.cuCtxGetId(ctx, &id);
    if (r != CUDA_SUCCESS) return r;
    // Under eng->mu: the state of this instance of `ctx`, retiring those of earlier instances.
    auto known = [&](CUresult* res) -> bool {
        for (auto it = eng->ctxs.rbegin(); it != eng->ctxs.rend(); ++it) {
            CtxState* cs = *it;
            if (cs->ctx != ctx) continue;
            if (cs->id != id) {
                retire(cs, CUDA_ERROR_CONTEXT_IS_DESTROYED);
                continue;
            }
            *res = cs->retired ? cs->error : cs->primary ? CUDA_SUCCESS : kNotPrimary;
            if (*res == kNotPrimary) *why = kNotPrimaryText;
            *out = cs;
            return true;
        }
        return false;
    };
    {
        std::lock_guard<std::mutex> g(eng->mu);
        if (known(&r)) return r;
    }
    auto cs = new CtxState;
    cs->ctx = ctx;
    cs->id = id;
    for (int d = 0; d < load().device_count && !cs->primary; ++d) {
        CUcontext p = nullptr;
        if (primary_of(d, &p) == CUDA_SUCCESS && p == ctx) {
            cs->primary = true;
            cs->device = d;
        }
    }
    std::lock_guard<std::mutex> g(eng->mu);
    if (known(&r)) {  // another thread met it meanwhile: one state per context
        delete cs;
        return r;
    }
    eng->ctxs.push_back(cs);  // non-primary ones too, so that they are refused without a retain
    *out = cs;
    if (!cs->primary) {
        *why = kNotPrimaryText;
        return kNotPrimary;
    }
    return CUDA_SUCCESS;
}

constexpr uintptr_t kLegacyHandle = 1, kPerThreadHandle = 2;  // CU_STREAM_LEGACY, CU_STREAM_PER_THREAD
bool is_legacy(uintptr_t stream) { return stream <= kLegacyHandle; }  // 0 means it too

// The context of `stream`. A legacy handle names no device: `device` says which, or else the
// current context. *cs == nullptr: the device has no active context, so nothing can be queued.
CUresult stream_ctx(uintptr_t stream, int device, CtxState** cs, std::string* why) {
    CUresult r;
    CUcontext ctx = nullptr;
    *cs = nullptr;
    if (device >= 0 && (r = check_device(device, why)) != CUDA_SUCCESS) return r;
    if (stream == kPerThreadHandle) {
        // It names the *calling* thread's default stream: aiocuda's threads would mark their own.
        *why = "stream handle 2 (CU_STREAM_PER_THREAD) names the calling thread's own default "
               "stream, which aiocuda cannot mark from its threads: await that stream's object "
               "(for example torch.cuda.current_stream()) or use the legacy stream (0)";
        return kPerThread;
    }
    if (!is_legacy(stream)) {
        if ((r = api.cuStreamGetCtx(reinterpret_cast<CUstream>(stream), &ctx)) != CUDA_SUCCESS)
            return r;
    } else if (device >= 0) {
        if ((r = primary_of(device, &ctx)) != CUDA_SUCCESS || !ctx) return r;
    } else {
        if ((r = api.cuCtxGetCurrent(&ctx)) != CUDA_SUCCESS) return r;
        if (!ctx) {
            *why = "stream handle " + std::to_string(stream) + " names the default stream of the "
                   "current CUDA context, and none is current on this thread: say which device "
                   "(for example aiocuda.synchronize(0, device=1))";
            return kNoContext;
        }
    }
    if ((r = ctx_state(ctx, cs, why)) != CUDA_SUCCESS) return r;
    if (device >= 0 && (*cs)->device != device) {
        *why = "the stream belongs to CUDA device " + std::to_string((*cs)->device) +
               ", not device " + std::to_string(device) + " as device= says";
        *cs = nullptr;
        return kBadDevice;
    }
    return CUDA_SUCCESS;
}

// The timeline of `stream` (or of the context, kDevice), made on first use and held by the caller
// until release_timeline(): the engine drops idle timelines nobody holds. Streams are told apart by
// cuStreamGetId ("unique for the life of the program"), not by handle: once a stream is destroyed
// its handle may name a new stream, which must not inherit its marks or word.
CUresult timeline_of(CtxState* cs, Timeline::Kind kind, uintptr_t stream, Timeline** out) {
    unsigned long long sid = 0;
    bool keyed = kind == Timeline::kStream && !is_legacy(stream);
    if (keyed) {
        CUresult r = api.cuStreamGetId(reinterpret_cast<CUstream>(stream), &sid);
        if (r != CUDA_SUCCESS) return r;
    }
    std::lock_guard<std::mutex> g(eng->mu);
    Timeline*& tl = kind == Timeline::kDevice ? cs->device_tl
                    : keyed                   ? cs->streams[sid]
                                              : cs->legacy_tl;  // one legacy stream: one timeline
    if (!tl) {
        tl = new Timeline;
        tl->kind = kind;
        tl->cs = cs;
        tl->sid = sid;
        tl->stream = reinterpret_cast<CUstream>(keyed ? stream : kLegacyHandle);
        ++eng->timelines;
    }
    ++tl->users;
    *out = tl;
    return CUDA_SUCCESS;
}

void release_timeline(Timeline* tl) {
    std::lock_guard<std::mutex> g(eng->mu);
    --tl->users;
}

// Under eng->mu, once `tl` left the engine's list: a stream's timeline that nothing refers to is
// dropped, and its word (every mark on it passed, so its stream writes it no more) reused.
void maybe_drop(Timeline* tl) {
    CtxState* cs = tl->cs;
    if (tl->kind != Timeline::kStream || tl->relay || tl == cs->legacy_tl || tl->users ||
        tl->alive || tl->placing || tl->open || tl->head || tl->lane || cs->retired)
        return;
    cs->streams.erase(tl->sid);
    if (tl->word) cs->words.emplace_back(tl->word, tl->dword);
    delete tl;
    --eng->timelines;
}

// A pooled event of `cs`, or a new one. Created in thread-local capture mode: event creation
// is no part of anyone's capture.
CUresult take_event(CtxState* cs, CUevent* ev) {
    {
        std::lock_guard<std::mutex> g(eng->mu);
        if (!cs->pool.empty()) {
            *ev = cs->pool.back();
            cs->pool.pop_back();
            return CUDA_SUCCESS;
        }
    }
    CUresult r = thread_local_mode([&] {
        return with_ctx(cs->ctx, [&] { return api.cuEventCreate(ev, kEventFlags); });
    });
    if (r == CUDA_SUCCESS) {
        std::lock_guard<std::mutex> g(eng->mu);
        ++eng->events;
    }
    return r;
}

// The one operation an await puts on the user's stream (or on the context, for device waits).
CUresult record_on(Timeline* tl, CUevent ev) {
    if (tl->kind == Timeline::kDevice) return api.cuCtxRecordEvent(tl->cs->ctx, ev);
    if (!is_legacy(reinterpret_cast<uintptr_t>(tl->stream))) return api.cuEventRecord(ev, tl->stream);
    return with_ctx(tl->cs->ctx, [&] { return api.cuEventRecord(ev, tl->stream); });
}

CUresult capture_status(Timeline* tl, CUstreamCaptureStatus* st) {
    *st = CU_STREAM_CAPTURE_STATUS_NONE;
    if (tl->kind != Timeline::kStream) return CUDA_SUCCESS;
    if (!is_legacy(reinterpret_cast<uintptr_t>(tl->stream)))
        return api.cuStreamIsCapturing(tl->stream, st);
    return with_ctx(tl->cs->ctx, [&] { return api.cuStreamIsCapturing(tl->stream, st); });
}

void start_engine_locked();
void wake_locked() {
    eng->kick = true;
    if (eng->sleeping) eng->cv.notify_one();
}

// A flag mark was placed: wake the engine thread only if it sleeps past when this one may pass.
void nudge_locked(Timeline* tl) {
    if (!eng->sleeping) return;
    auto due = Clock::now() + std::chrono::nanoseconds(tl->est_ns) - kFlagLead;
    if (due < eng->sleep_until) eng->cv.notify_one();
}

// kFlag: the word `tl`'s stream writes its marks to, taken from a page of registered host memory
// (one page per 64 timelines of a context). False: the driver cannot do it, and `tl` marks with
// events. Loop or placer thread, tl->record_mu held.
bool flag_word(Timeline* tl) {
    if (tl->word) return true;
    CtxState* cs = tl->cs;
    {
        std::lock_guard<std::mutex> g(eng->mu);
        if (tl->kind != Timeline::kStream || cs->no_words || !api.cuStreamWriteValue32 ||
            !api.cuMemHostRegister || !api.cuMemHostGetDevicePointer)
            tl->no_flag = true;
        if (tl->no_flag) return false;
        if (!cs->words.empty()) {  // a dropped timeline's: its stream wrote its last value
            std::tie(tl->word, tl->dword) = cs->words.back();
            cs->words.pop_back();
            tl->issued = __atomic_load_n(tl->word, __ATOMIC_ACQUIRE);  // marks count on from it
            return true;
        }
    }
    void* page = nullptr;
    if (posix_memalign(&page, kFlagPage, kFlagPage) != 0) return false;
    std::memset(page, 0, kFlagPage);
    CUdeviceptr d = 0;
    bool registered = false;
    // cuMemHostRegister: "Page-locks the memory range [...] and maps it for the device(s)";
    // cuStreamWriteValue32: "If the memory was registered via cuMemHostRegister(), the device
    // pointer should be obtained with cuMemHostGetDevicePointer()."
    CUresult r = thread_local_mode([&] {
        return with_ctx(cs->ctx, [&] {
            CUresult rr = api.cuMemHostRegister(page, kFlagPage, kMemHostRegisterDeviceMap);
            registered = rr == CUDA_SUCCESS;
            if (registered) rr = api.cuMemHostGetDevicePointer(&d, page, 0);
            return rr;
        });
    });
    std::lock_guard<std::mutex> g(eng->mu);
    if (r != CUDA_SUCCESS) {
        if (!registered) std::free(page);  // else leaked: unregistering it could fail the same way
        cs->no_words = tl->no_flag = true;
        return false;
    }
    char* base = static_cast<char*>(page);
    for (size_t off = kFlagPage; off > 0; off -= kFlagWordStride)
        cs->words.emplace_back(reinterpret_cast<uint32_t*>(base + off - kFlagWordStride),
                               d + off - kFlagWordStride);
    eng->words += kFlagPage / kFlagWordStride;
    std::tie(tl->word, tl->dword) = cs->words.back();
    cs->words.pop_back();
    return true;
}

// What put() placed on a stream.
struct Placed {
    CUevent ev = nullptr;
    bool flag = false;
    uint32_t seq = 0;
};

const char* const kCapturedText =
    "the stream began capturing a CUDA graph while aiocuda marked it (another thread began the "
    "capture), so the mark may be part of the graph and cannot tell when the work ends: await "
    "the stream after the capture ends";

// The one operation an await puts on the user's stream (or on the context, for device waits),
// then a second capture check (tl->record_mu held). A capture may begin between the check before
// and the mark, and a mark taken into a capture never tells when the stream's work ends: its
// awaits are refused (kCapturing), and a flag word a graph may write is never read again.
CUresult put(Timeline* tl, Placed* p, std::string* why) {
    CUresult r = CUDA_ERROR_NOT_SUPPORTED;
    if (current_strategy() == Strategy::kFlag && flag_word(tl)) {
        p->flag = true;
        p->seq = tl->issued + 1;
        CUstream st = tl->stream;
        auto write = [&] {
            return api.cuStreamWriteValue32(st, tl->dword, p->seq, CU_STREAM_WRITE_VALUE_DEFAULT);
        };
        r = is_legacy(reinterpret_cast<uintptr_t>(st)) ? with_ctx(tl->cs->ctx, write) : write();
        if (r == CUDA_SUCCESS) tl->issued = p->seq;
        if (r == CUDA_ERROR_NOT_SUPPORTED) {  // no stream memory operations: events, from now on
            std::lock_guard<std::mutex> g(eng->mu);
            tl->no_flag = true;
        }
    }
    if (r == CUDA_ERROR_NOT_SUPPORTED) {
        *p = Placed{};
        r = take_event(tl->cs, &p->ev);
        if (r == CUDA_SUCCESS) r = record_on(tl, p->ev);
    }
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    if (r == CUDA_SUCCESS && capture_status(tl, &st) == CUDA_SUCCESS &&
        st != CU_STREAM_CAPTURE_STATUS_NONE) {
        *why = kCapturedText;
        r = kCapturing;
        std::lock_guard<std::mutex> g(eng->mu);
        if (p->flag) {  // the word may be written by every replay: earlier marks cannot trust it
            for (Mark* m = tl->head; m; m = m->next)
                if (m->flag && !m->done) finish(m, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
            tl->word = nullptr;
            tl->dword = 0;
        }
    }
    if (r != CUDA_SUCCESS && p->ev) {
        std::lock_guard<std::mutex> g(eng->mu);
        if (!tl->cs->retired) tl->cs->pool.push_back(p->ev);
        p->ev = nullptr;
    }
    return r;
}

// Places a mark on `tl` now (the caller holds tl->record_mu), for `n` and, if `user`, an Event.
CUresult place_now(Timeline* tl, Node* n, Mark** user, std::string* why) {
    Placed p;
    CUresult r = put(tl, &p, why);
    std::lock_guard<std::mutex> g(eng->mu);
    if (r != CUDA_SUCCESS) return r;
    Mark* m = new_mark(tl);
    m->flag = p.flag;
    m->seq = p.seq;
    placed(tl, m, p.ev);
    if (n) attach(m, n);
    if (user) {
        ++m->refs;
        *user = m;
    }
    activate(tl);
    start_engine_locked();
    if (p.flag) nudge_locked(tl); else wake_locked();
    return CUDA_SUCCESS;
}

// Loop thread: mark `tl` for `n` (and an Event), or join its open mark when kMarksInFlight are out.
CUresult mark(Timeline* tl, Node* n, Mark** user, std::string* why) {
    CUstreamCaptureStatus st;
    CUresult r = capture_status(tl, &st);
    if (r == CUDA_SUCCESS && st != CU_STREAM_CAPTURE_STATUS_NONE) {
        *why = "the stream is capturing a CUDA graph: its work will not run until the graph is "
               "launched, so awaiting it now would never finish; await it after the capture ends "
               "(or await the graph's replay, aiocuda.torch.replay)";
        r = kCapturing;
    }
    if (r != CUDA_SUCCESS) {
        if (n) discard(n);
        return r;
    }
    // Under eng->mu: join the open mark if kMarksInFlight are out (or one is open already);
    // false if this await may place its own mark. Joining needs no driver call, so it never waits
    // behind a placement that a full stream holds up.
    auto joined = [&](CUresult* res) {
        *res = CUDA_SUCCESS;
        if (tl->cs->retired) {
            if (n) discard(n);
            *res = tl->cs->error;
            return true;
        }
        reap(tl);
        if (tl->in_flight < kMarksInFlight && !tl->open) return false;
        if (!tl->open) {
            start_placer(tl->cs->device);
            tl->open = new_mark(tl);
        }
        if (n) attach(tl->open, n);
        if (user) {
            ++tl->open->refs;
            *user = tl->open;
        }
        if (activate(tl)) wake_locked();
        start_engine_locked();
        want_placing(tl);  // room may have freed up since the open mark was made
        return true;
    };
    {
        std::lock_guard<std::mutex> g(eng->mu);
        if (joined(&r)) return r;
    }
    std::lock_guard<std::mutex> order(tl->record_mu);
    {
        std::lock_guard<std::mutex> g(eng->mu);
        if (joined(&r)) return r;  // others marked meanwhile
    }
    r = place_now(tl, n, user, why);
    if (r != CUDA_SUCCESS && n) discard(n);
    return r;
}

// ---- placers: open marks, one thread per device ------------------------------------------------

void placer_run(Placer* p);

// Under eng->mu, on the loop thread: the placer of device `dev`, started with the device's first
// open mark (so that host functions, which hand it work, never start a thread).
void start_placer(int dev) {
    auto& ps = eng->placers;
    if (ps.size() <= static_cast<size_t>(dev)) ps.resize(dev + 1, nullptr);
    if (ps[dev]) return;
    auto p = new Placer;
    std::thread(placer_run, p).detach();  // may throw: nothing is changed before it
    ps[dev] = p;
    ++eng->threads;
}

// Under eng->mu: queue `tl` for its device's placer if its open mark has room now.
void want_placing(Timeline* tl) {
    if (!tl->open || tl->placing || tl->cs->retired || tl->in_flight >= kMarksInFlight) return;
    Placer* p = eng->placers[tl->cs->device];  // started with the open mark
    tl->placing = true;
    p->queue.push_back(tl);
    p->cv.notify_one();
}

// Places `tl`'s open mark; false if it must wait (the stream is capturing: after it ends).
bool place_open(Timeline* tl) {
    std::lock_guard<std::mutex> order(tl->record_mu);
    Mark* open;
    {
        std::lock_guard<std::mutex> g(eng->mu);
        tl->placing = false;
        open = tl->open;
        if (!open || tl->cs->retired || tl->in_flight >= kMarksInFlight) return true;
    }
    // A reset since the open mark was queued destroyed the stream and the pooled events: find it
    // (and retire the context) before touching any of them.
    if (!still_current(tl->cs)) return true;
    CUstreamCaptureStatus st;
    CUresult r = capture_status(tl, &st);
    if (r == CUDA_SUCCESS && st != CU_STREAM_CAPTURE_STATUS_NONE) return false;
    Placed p;
    std::string why;
    if (r == CUDA_SUCCESS) r = put(tl, &p, &why);
    if (r == kCapturing) r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;  // taken into a capture
    std::lock_guard<std::mutex> g(eng->mu);
    if (tl->open != open || tl->cs->retired) {  // failed meanwhile (its handles are not ours)
        if (p.ev && !tl->cs->retired) tl->cs->pool.push_back(p.ev);
        return true;
    }
    tl->open = nullptr;
    if (r != CUDA_SUCCESS) {
        // Only these awaits fail: a capture that began meanwhile, or no memory for an event, is
        // no context error (a sticky one the next query of this context finds). They fail in
        // stream order: after the marks placed before, which may still be pending.
        open->fail = r;
        if (tl->tail) tl->tail->next = open; else tl->head = open;
        tl->tail = open;  // unplaced: no event, never queried or watched
        reap(tl);
        return true;
    }
    open->flag = p.flag;
    open->seq = p.seq;
    placed(tl, open, p.ev);
    if (p.flag) nudge_locked(tl); else wake_locked();
    return true;
}

void placer_run(Placer* p) {
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    api.cuThreadExchangeStreamCaptureMode(&mode);
    std::vector<Timeline*> work, later;
    for (;;) {
        {
            std::unique_lock<std::mutex> g(eng->mu);
            auto ready = [&] { return !p->queue.empty() && !eng->held; };
            if (later.empty()) p->cv.wait(g, ready);
            else p->cv.wait_for(g, std::chrono::milliseconds(1), ready);  // a capture to end
            while (eng->held) eng->hold_cv.wait(g);
            work.swap(p->queue);
            for (Timeline* tl : later)
                if (!tl->placing) work.push_back(tl);
            later.clear();
            ++eng->placing;
        }
        for (Timeline* tl : work)
            if (!place_open(tl)) later.push_back(tl);
        work.clear();
        std::lock_guard<std::mutex> g(eng->mu);
        if (--eng->placing == 0) eng->hold_cv.notify_all();
    }
}

// ---- the engine thread -------------------------------------------------------------------------

void device_waiter_run(DeviceWaiter* w);

bool is_capture_error(CUresult r) { return r >= 900 && r <= 908; }  // CUDA_ERROR_STREAM_CAPTURE_*

// ---- kFlag: reading the words ------------------------------------------------------------------

// When the engine thread should look at the words again: now (spin), at a time, or never (no flag
// mark is pending).
struct FlagPlan {
    bool pending = false;
    Clock::time_point next = Clock::time_point::max();
};

// Under eng->mu: completes every flag mark whose word its stream has written (plain loads, no
// driver call), learns how long marks take, and plans the next look. A word only grows (cyclic,
// as cuStreamWaitValue32 compares): a value that reached a mark's sequence number passed it.
FlagPlan read_flags(Clock::time_point now, bool* progress) {
    FlagPlan plan;
    // A mark seen passed now passed after the previous look: that look's time is what it took at
    // least. Learning from it (not from now) keeps a late wake-up from teaching a later one.
    Clock::time_point prev = eng->last_look;
    eng->last_look = now;
    for (Timeline* tl : eng->active) {
        if (!tl->word || tl->cs->retired) continue;
        uint32_t v = __atomic_load_n(tl->word, __ATOMIC_ACQUIRE);
        Mark* upto = nullptr;
        Mark* oldest = nullptr;
        for (Mark* m = tl->head; m; m = m->next) {
            if (!m->flag || m->done) continue;
            if (static_cast<int32_t>(v - m->seq) >= 0) upto = m;
            else if (!oldest) oldest = m;
        }
        if (upto) {
            // Its history: how long the newest passed mark took, seen now. Quick to come down and
            // slow to go up, so that the thread wakes early rather than late.
            int64_t took = std::chrono::duration_cast<std::chrono::nanoseconds>(
                std::max(prev, upto->at) - upto->at).count();
            tl->est_ns += (took - tl->est_ns) / (took < tl->est_ns ? 2 : 8);
            passed(upto, CUDA_SUCCESS);
            reap(tl);  // hands the open mark, if any, to its placer
            *progress = true;
        }
        if (!oldest) continue;
        plan.pending = true;
        auto due = oldest->at + std::chrono::nanoseconds(tl->est_ns);
        auto lead = kFlagLead + std::chrono::nanoseconds(tl->est_ns / 16);
        Clock::time_point next;
        if (now < due - lead) next = due - lead;               // sleep through most of it
        else if (now < due + kFlagSpin) next = now;            // due: spin
        else next = now + std::min<Clock::duration>(kFlagMaxNap, (now - due) / 16);  // late: nap
        plan.next = std::min(plan.next, next);
    }
    return plan;
}

// One pass of the engine's driver calls; returns whether anything completed or was placed.
bool pass(Strategy strat, bool backstop) {
    struct Watch { Mark* m; CUevent ev; Lane* lane; bool make_lane; CtxState* cs; };
    std::vector<Watch> watches;
    auto& tls = eng->tls;
    auto& ctxs = eng->pass_ctxs;
    tls.clear();
    ctxs.clear();
    bool progress = false;
    {
        std::lock_guard<std::mutex> g(eng->mu);
        read_flags(Clock::now(), &progress);
        tls = eng->active;
        for (Timeline* tl : tls)
            if (!tl->cs->retired && std::find(ctxs.begin(), ctxs.end(), tl->cs) == ctxs.end())
                ctxs.push_back(tl->cs);
        if (strat == Strategy::kCallback) {
            watches.reserve(eng->to_watch.size());
            for (Mark* m : eng->to_watch) {
                Timeline* tl = m->tl;
                if (m->done) {
                    unwatch(m);
                    continue;
                }
                Watch w{m, m->ev, tl->lane, false, tl->cs};
                if (!w.lane) {  // a lane of its own if one is idle or may be made; else share
                    auto& ls = tl->cs->lanes;
                    auto it = std::find_if(ls.begin(), ls.end(), [](Lane* l) { return l->users == 0; });
                    if (it != ls.end()) {
                        w.lane = *it;
                    } else if (ls.size() < kLanesPerContext) {
                        w.lane = new Lane{nullptr, 0};  // its stream is made below, before use
                        w.make_lane = true;
                        ls.push_back(w.lane);
                        ++eng->lanes;
                    } else {
                        w.lane = *std::min_element(ls.begin(), ls.end(), [](Lane* a, Lane* b) {
                            return a->users < b->users;
                        });
                    }
                    ++w.lane->users;
                    tl->lane = w.lane;
                }
                ++tl->watching;
                watches.push_back(w);
            }
            eng->to_watch.clear();
        } else {
            for (Mark* m : eng->to_watch) unwatch(m);  // queued before a switch to polling
            eng->to_watch.clear();
        }
    }
    // A reset (a new context id) retires the context before any of its handles is touched.
    for (CtxState* cs : ctxs)
        if (!still_current(cs)) progress = true;
    // A lane that cannot wait or launch fails that mark's awaits only; a sticky context error
    // behind it is found by the next query.
    for (Watch& w : watches) {
        bool retired;
        {
            std::lock_guard<std::mutex> g(eng->mu);
            retired = w.cs->retired;
        }
        CUresult r = CUDA_SUCCESS;
        if (!retired && w.make_lane)
            r = with_ctx(w.cs->ctx, [&] { return api.cuStreamCreate(&w.lane->s, CU_STREAM_NON_BLOCKING); });
        if (!retired && r == CUDA_SUCCESS && !w.lane->s) r = CUDA_ERROR_INVALID_HANDLE;  // its making failed
        if (!retired && r == CUDA_SUCCESS) r = api.cuStreamWaitEvent(w.lane->s, w.ev, 0);
        if (!retired && r == CUDA_SUCCESS)
            r = api.cuLaunchHostFunc(w.lane->s, on_host_fn, reinterpret_cast<void*>(w.m->key));
        if (retired || r != CUDA_SUCCESS) {
            // The mark stays in its timeline unwatched: the backstop's queries complete it, in
            // stream order, and find a sticky error behind the failure if there is one.
            std::lock_guard<std::mutex> g(eng->mu);
            --w.m->tl->watching;
            if (!w.lane->s && !w.lane->dead) {  // never to be used again: lanes are made anew
                w.lane->dead = true;
                auto& ls = w.cs->lanes;
                ls.erase(std::remove(ls.begin(), ls.end(), w.lane), ls.end());
                --eng->lanes;
            }
            unwatch(w.m);
            reap(w.m->tl);
        }
    }
    // Flag marks report no error: a sticky one stops the stream before its write. The backstop
    // asks an idle aiocuda stream of each context, which reports it (cuStreamQuery: "this
    // function may also return error codes from previous, asynchronous launches").
    if (backstop) {
        for (CtxState* cs : ctxs) {
            bool flags = false;
            {
                std::lock_guard<std::mutex> g(eng->mu);
                if (cs->retired) continue;
                for (Timeline* tl : tls)
                    if (tl->cs == cs && tl->word && tl->head) flags = true;
            }
            if (!flags) continue;
            CUresult r = cs->probe ? CUDA_SUCCESS : with_ctx(cs->ctx, [&] {
                return api.cuStreamCreate(&cs->probe, CU_STREAM_NON_BLOCKING);
            });
            if (r == CUDA_SUCCESS) r = api.cuStreamQuery(cs->probe);
            if (r != CUDA_SUCCESS && r != CUDA_ERROR_NOT_READY) {
                std::lock_guard<std::mutex> g(eng->mu);
                retire(cs, r);
                progress = true;
            }
        }
    }
    // Queries: every pass when polling; once per backstop period for the callback strategy, where
    // they find what host functions cannot report: the driver never calls them after an error.
    if (strat == Strategy::kPoll || backstop) {
        auto& marks = eng->queried;
        for (Timeline* tl : tls) {
            marks.clear();
            {
                std::lock_guard<std::mutex> g(eng->mu);
                if (tl->cs->retired) continue;
                for (Mark* m = tl->head; m; m = m->next)
                    if (!m->done && m->ev) {  // not one that could not be placed
                        ++m->refs;  // kept while queried outside the lock
                        marks.push_back(m);
                    }
            }
            if (marks.empty()) continue;
            // The newest mark passed means all have; else walk from the oldest.
            CUresult r = api.cuEventQuery(marks.back()->ev);
            Mark* upto = r == CUDA_SUCCESS ? marks.back() : nullptr;
            Mark* failed = r != CUDA_SUCCESS && r != CUDA_ERROR_NOT_READY ? marks.back() : nullptr;
            for (size_t i = 0; r == CUDA_ERROR_NOT_READY && i + 1 < marks.size(); ++i) {
                r = api.cuEventQuery(marks[i]->ev);
                if (r == CUDA_SUCCESS) upto = marks[i];
                else if (r != CUDA_ERROR_NOT_READY) failed = marks[i];
                if (r == CUDA_SUCCESS) r = CUDA_ERROR_NOT_READY;  // keep walking
                else break;
            }
            std::lock_guard<std::mutex> g(eng->mu);
            if (failed && failed->owned && !is_capture_error(r)) {
                retire(tl->cs, r);  // aiocuda's own event: the context is broken
            } else if (failed) {
                finish(failed, r);  // a foreign event, or a mark a capture took: that wait only
            } else if (upto) {
                passed(upto, CUDA_SUCCESS);
            }
            progress |= failed || upto;
            for (Mark* m : marks) unref(m);
        }
    }
    {
        std::lock_guard<std::mutex> g(eng->mu);
        auto& act = eng->active;
        for (size_t i = 0; i < act.size();) {
            Timeline* tl = act[i];
            reap(tl);
            if (tl->cs->retired || idle(tl)) {
                tl->active = false;
                act[i] = act.back();
                act.pop_back();
                if (tl->kind == Timeline::kForeign && tl->alive == 0) delete tl;
                else maybe_drop(tl);
            } else {
                ++i;
            }
        }
    }
    return progress;
}

void engine_run() {
    // aiocuda's thread never captures, so thread-local mode lets it query and launch while a
    // user's thread captures in global mode (pytorch#104555 is this bug in NCCL's watchdog).
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    api.cuThreadExchangeStreamCaptureMode(&mode);
    auto last_progress = Clock::now();
    auto last_backstop = Clock::now();
#ifdef __linux__
    prctl(PR_SET_TIMERSLACK, 1000UL);  // the poll strategy's naps are tens of microseconds
#endif
    for (;;) {
        Strategy strat;
        auto now = Clock::now();
        auto backstop_every = std::chrono::milliseconds(g_backstop_ms.load());
        {
            std::unique_lock<std::mutex> g(eng->mu);
            eng->in_pass = false;
            eng->hold_cv.notify_all();
            while (eng->held || eng->active.empty()) {
                eng->sleeping = true;
                eng->sleep_until = Clock::time_point::max();
                (eng->held ? eng->hold_cv : eng->cv).wait(g);
                eng->sleeping = false;
                last_progress = now = Clock::now();
            }
            // Read after the wait: a switch meanwhile must not leave new marks unwatched.
            strat = current_strategy();
            if (strat != Strategy::kPoll) {
                // Between passes host functions report event marks, and this thread reads the
                // flag words: plain loads under the engine's lock, sleeping until one is due. A
                // pass (driver calls) runs for new watches, a kick, or the backstop.
                for (;;) {
                    now = Clock::now();
                    bool progress = false;
                    FlagPlan plan = read_flags(now, &progress);
                    if (eng->held || !eng->to_watch.empty() || eng->kick ||
                        now >= last_backstop + backstop_every)
                        break;
                    if (plan.next > now) {
                        eng->sleeping = true;
                        eng->sleep_until = std::min(plan.next, last_backstop + backstop_every);
                        eng->cv.wait_until(g, eng->sleep_until);
                        eng->sleeping = false;
                        continue;
                    }
                    g.unlock();  // due: spin, without the lock (the loop thread takes it to mark)
                    for (int i = 0; i < 64; ++i) cpu_relax();
                    g.lock();
                }
                now = Clock::now();
                strat = current_strategy();
            }
            if (eng->held) continue;
            eng->kick = false;
            eng->in_pass = true;
        }
        bool backstop = now - last_backstop >= backstop_every;
        if (backstop) last_backstop = now;
        if (pass(strat, backstop)) last_progress = Clock::now();
        if (strat == Strategy::kPoll) {
            auto quiet = Clock::now() - last_progress;
            if (quiet < kPollSpin) {
                for (int i = 0; i < 32; ++i) cpu_relax();
            } else {
                // Back off, in proportion to how long nothing happened; new marks wake it.
                auto nap = std::min<Clock::duration>(kPollMaxSleep, quiet / 64);
                std::unique_lock<std::mutex> g(eng->mu);
                eng->sleeping = true;
                eng->sleep_until = Clock::now() + nap;
                eng->cv.wait_until(g, eng->sleep_until);
                eng->sleeping = false;
            }
        }
    }
}

void start_engine_locked() {
    if (eng->started) return;
    std::thread(engine_run).detach();  // may throw: nothing is changed before it
    eng->started = true;
    ++eng->threads;
}

void device_waiter_run(DeviceWaiter* w) {
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    api.cuThreadExchangeStreamCaptureMode(&mode);
    api.cuCtxSetCurrent(w->ctx);
    std::vector<std::pair<Node*, unsigned long long>> taken;
    for (;;) {
        {
            std::unique_lock<std::mutex> g(w->mu);
            w->cv.wait(g, [&] { return !w->waiting.empty(); });
            taken.swap(w->waiting);
        }
        CUresult r = api.cuCtxSynchronize();  // covers all work queued before these requests
        unsigned long long now = 0;
        CUresult id = api.cuCtxGetId(w->ctx, &now);
        for (auto& [n, asked_in] : taken)
            complete(n, r != CUDA_SUCCESS ? r
                        : id != CUDA_SUCCESS ? id
                        : asked_in != now ? CUDA_ERROR_CONTEXT_IS_DESTROYED : CUDA_SUCCESS);
        taken.clear();
    }
}

}  // namespace

// Runs on the driver's callback thread: native memory only, no GIL, no CUDA call.
void on_host_fn(void* key) {
    std::lock_guard<std::mutex> g(eng->mu);
    Mark* m = slot_get(reinterpret_cast<uintptr_t>(key));
    if (!m) return;
    Timeline* tl = m->tl;
    --tl->watching;
    m->watched = false;
    if (!tl->cs->retired) {
        passed(m, CUDA_SUCCESS);
        reap(tl);  // hands the open mark, if any, to its placer
    }
    unref(m);  // the watch's reference
}

CUresult wait_stream(uintptr_t stream, int device, Node* n, std::string* why) {
    return record(stream, device, n, nullptr, why);
}

CUresult record(uintptr_t stream, int device, Node* n, Mark** user, std::string* why) {
    CtxState* cs = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = stream_ctx(stream, device, &cs, why);
    if (r != CUDA_SUCCESS) {
        if (n) discard(n);
        return r;
    }
    if (!cs) {  // no context on that device: nothing was queued, so nothing to wait for
        std::lock_guard<std::mutex> g(eng->mu);
        Timeline* tl = new Timeline;  // a done mark for the Event, on a throwaway timeline
        tl->kind = Timeline::kForeign;
        static CtxState none{};
        none.retired = true;
        tl->cs = &none;
        Mark* m = new_mark(tl);
        m->done = true;
        if (user) *user = m; else unref(m);
        if (n) complete(n, CUDA_SUCCESS);
        return CUDA_SUCCESS;
    }
    Timeline* tl;
    if ((r = timeline_of(cs, Timeline::kStream, stream, &tl)) != CUDA_SUCCESS) {
        if (n) discard(n);
        return r;
    }
    r = mark(tl, n, user, why);
    release_timeline(tl);
    return r;
}

const char* const kCapturedEventText =
    "the event was last recorded inside a CUDA graph capture, so it does not stand for work that "
    "will run: await it after recording it outside the capture (or await the graph's replay)";

// How many awaits are pending on `tl` (under eng->mu): on a relay, the waits it holds queued.
size_t load_of(Timeline* tl) {
    size_t n = tl->open ? tl->open->waiters : 0;
    for (Mark* m = tl->head; m; m = m->next) n += m->waiters;
    return n;
}

// A relay stream of `cs` for a foreign event: an idle one, a new one while there are fewer than
// kRelays, else the least loaded (its awaits may then over-wait behind another event's work). A
// relay holds at most kRelayWaits waits: an enqueue on a full stream would block the loop thread.
CUresult take_relay(CtxState* cs, int device, Timeline** out, std::string* why) {
    {
        std::lock_guard<std::mutex> g(eng->mu);
        Timeline* best = nullptr;
        for (Timeline* tl : cs->relays)
            if (!best || load_of(tl) < load_of(best)) best = tl;
        if (best && (load_of(best) == 0 || cs->relays.size() >= kRelays)) {
            if (load_of(best) >= kRelayWaits) {
                *why = "too many CUDA event awaits are pending on device " + std::to_string(device) +
                       " (" + std::to_string(kRelays * kRelayWaits) + "): await fewer events at "
                       "once, or await the streams they were recorded on";
                return kTooMany;
            }
            ++best->users;
            *out = best;
            return CUDA_SUCCESS;
        }
    }
    CUstream st = nullptr;
    CUresult r = thread_local_mode([&] {
        return with_ctx(cs->ctx, [&] { return api.cuStreamCreate(&st, CU_STREAM_NON_BLOCKING); });
    });
    if (r != CUDA_SUCCESS) return r;
    auto tl = new Timeline;
    tl->kind = Timeline::kStream;
    tl->cs = cs;
    tl->relay = true;
    tl->stream = st;
    tl->users = 1;
    std::lock_guard<std::mutex> g(eng->mu);
    cs->relays.push_back(tl);
    *out = tl;
    return CUDA_SUCCESS;
}

CUresult wait_event(uintptr_t event, int device, Node* n, std::string* why) {
    CUcontext ctx = nullptr;
    CtxState* cs = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = check_device(device, why);
    if (r == CUDA_SUCCESS) r = primary_of(device, &ctx);
    if (r == CUDA_SUCCESS && !ctx) {
        *why = "CUDA device " + std::to_string(device) + " has no active context, so the event "
               "cannot have been recorded there: pass the device the event belongs to";
        r = kBadDevice;
    }
    if (r == CUDA_SUCCESS) r = ctx_state(ctx, &cs, why);
    if (r != CUDA_SUCCESS) {
        discard(n);
        return r;
    }
    // Read the event now, on this thread: cuEventRecord's other APIs "use the most recently
    // captured state at the time of the API call", and its owner may record it again or destroy it
    // (torch does both) once this await has ended or was cancelled. A query (thread-local capture
    // mode) says whether it has passed, or was last recorded inside a capture, which aiocuda must
    // never wait on ("CUDA_ERROR_CAPTURED_EVENT: the operation is not permitted on an event which
    // was last recorded in a capturing stream"); otherwise one of aiocuda's relay streams waits on
    // it (an enqueue, which reads it now) and is marked like any stream.
    CUevent ev = reinterpret_cast<CUevent>(event);
    r = thread_local_mode([&] { return api.cuEventQuery(ev); });
    if (r == CUDA_SUCCESS) {
        complete(n, CUDA_SUCCESS);
        return CUDA_SUCCESS;
    }
    if (r == CUDA_ERROR_CAPTURED_EVENT) *why = kCapturedEventText, r = kCapturing;
    Timeline* relay = nullptr;
    if (r == CUDA_ERROR_NOT_READY) r = take_relay(cs, device, &relay, why);
    if (r == CUDA_SUCCESS) r = api.cuStreamWaitEvent(relay->stream, ev, 0);
    if (r != CUDA_SUCCESS) {
        discard(n);
    } else if ((r = mark(relay, n, nullptr, why)) == kCapturing) {
        // The event was recorded into a capture after the query: the relay joined that capture
        // and is never used again (the capture cannot end cleanly; nothing aiocuda can undo).
        *why = kCapturedEventText;
        std::lock_guard<std::mutex> g(eng->mu);
        auto& rs = cs->relays;
        rs.erase(std::remove(rs.begin(), rs.end(), relay), rs.end());
    }
    if (relay) release_timeline(relay);
    return r;
}

CUresult wait_device(int device, Node* n, std::string* why) {
    CUcontext ctx = nullptr;
    CtxState* cs = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = check_device(device, why);
    if (r == CUDA_SUCCESS) r = primary_of(device, &ctx);
    if (r == CUDA_SUCCESS && !ctx) {  // no context: nothing was queued on the device
        complete(n, CUDA_SUCCESS);
        return CUDA_SUCCESS;
    }
    if (r == CUDA_SUCCESS && api.cuCtxRecordEvent) r = ctx_state(ctx, &cs, why);
    if (r != CUDA_SUCCESS) {
        discard(n);
        return r;
    }
    if (cs) {
        Timeline* tl;
        timeline_of(cs, Timeline::kDevice, 0, &tl);  // no driver call for a device timeline
        r = mark(tl, n, nullptr, why);
        release_timeline(tl);
        return r;
    }
    DeviceWaiter* w;
    {
        std::lock_guard<std::mutex> g(eng->mu);
        auto& ws = eng->device_waiters;
        if (ws.size() <= static_cast<size_t>(device)) ws.resize(device + 1, nullptr);
        if (!ws[device]) {
            ws[device] = new DeviceWaiter;
            ws[device]->ctx = ctx;
            ++eng->threads;
            std::thread(device_waiter_run, ws[device]).detach();
        }
        w = ws[device];
    }
    unsigned long long id = 0;
    r = api.cuCtxGetId(ctx, &id);
    if (r != CUDA_SUCCESS) {
        discard(n);
        return r;
    }
    {
        std::lock_guard<std::mutex> g(w->mu);
        w->waiting.emplace_back(n, id);
    }
    w->cv.notify_one();
    return CUDA_SUCCESS;
}

// The event behind a mark a thread wants to query or wait on, once its context is known to be
// the one it was made in (a reset destroyed the events of the one before); else its result.
CUresult mark_event(Mark* m, bool wait_placed, CUevent* ev) {
    CtxState* cs;
    {
        std::unique_lock<std::mutex> g(eng->mu);
        if (wait_placed) eng->placed_cv.wait(g, [&] { return m->done || m->placed; });
        if (m->done) return m->status;
        if (!m->placed) return CUDA_ERROR_NOT_READY;
        cs = m->tl->cs;
        *ev = m->ev;
    }
    if (!still_current(cs)) {  // a reset dropped the work: the word will never be written
        std::lock_guard<std::mutex> g(eng->mu);
        return m->status;
    }
    if (m->flag) {  // no event: the word tells (a plain load), or the engine finishes the mark
        std::unique_lock<std::mutex> g(eng->mu);
        auto passed = [&] {
            uint32_t* w = m->tl->word;
            return m->done || (w && static_cast<int32_t>(__atomic_load_n(w, __ATOMIC_ACQUIRE) - m->seq) >= 0);
        };
        if (wait_placed && !passed()) {  // the backstop finishes it on a sticky error or reset
            ++eng->sync_waiters;
            eng->placed_cv.wait(g, passed);
            --eng->sync_waiters;
        }
        return m->done ? m->status : passed() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
    }
    return CUDA_SUCCESS;
}
CUresult mark_query(Mark* m, std::string* why) {
    CUevent ev = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = mark_event(m, false, &ev);
    if (r != CUDA_SUCCESS || !ev) return r;
    return thread_local_mode([&] { return api.cuEventQuery(ev); });
}

CUresult mark_synchronize(Mark* m, std::string* why) {
    CUevent ev = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = mark_event(m, true, &ev);
    if (r != CUDA_SUCCESS || !ev) return r;
    // A blocking-sync event: the thread sleeps instead of spinning.
    return thread_local_mode([&] { return api.cuEventSynchronize(ev); });
}

void mark_release(Mark* m) {
    if (!m || m->owner != eng) return;  // a forked child's copy of the parent's: leave it
    std::lock_guard<std::mutex> g(eng->mu);
    unref(m);
}

void set_strategy(Strategy s) {
    int old = g_strategy.exchange(static_cast<int>(s));
    std::lock_guard<std::mutex> g(eng->mu);
    if (old != static_cast<int>(s) && s != Strategy::kPoll) {
        // Every placed event mark not watched yet gets a host function (flag marks are read
        // whatever the strategy).
        for (Timeline* tl : eng->active)
            for (Mark* m = tl->head; m; m = m->next)
                if (!m->done && !m->watched && !m->flag && m->placed) watch(m);
    }
    wake_locked();
}

Strategy strategy() { return current_strategy(); }

void set_backstop_period_ms(int ms) { g_backstop_ms = std::max(1, ms); }

void hold(bool on) {
    std::unique_lock<std::mutex> g(eng->mu);
    eng->held = on;
    eng->hold_cv.notify_all();
    eng->cv.notify_all();
    if (!on)
        for (Placer* p : eng->placers)
            if (p) p->cv.notify_all();
    if (on) eng->hold_cv.wait(g, [] { return !eng->in_pass && eng->placing == 0; });
}

void after_fork_in_child() {
    // Only this thread exists now: the parent's locks may be held forever and its records belong
    // to its queues. Start from a fresh engine and leak the old one.
    eng = new Engine;
    mark_forked();
}

Stats stats() {
    std::lock_guard<std::mutex> g(eng->mu);
    return Stats{eng->pending, eng->marks,   eng->events,   eng->lanes,
                 eng->threads, eng->words, eng->timelines};
}

}  // namespace aiocuda::cuda
