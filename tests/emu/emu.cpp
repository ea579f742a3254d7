// A strict CUDA driver emulator for aiocuda's tests (test-only: built by tests/emu/build.py into
// libcuda_emu.so, loaded through AIOCUDA_LIBCUDA, never installed). It implements the subset of the
// driver API that aiocuda, its tests and its benchmarks call as strictly as cuda.h (CUDA 13)
// describes the real driver, never kinder. Each rule quotes the cuda.h text it models; where cuda.h
// is silent the comment says "Choice:" and why. It stands in for hardware CI lacks; it never
// replaces a GPU run.
//
// Model: a context owns streams; each stream is a native worker thread executing its FIFO of items
// (kernels from emu_enqueue_sleep, event records, event waits, waits on a registered host word,
// host-function calls, context-wide records) like a GPU front end. A stream holds a bounded number
// of pending items and an enqueue on a full one blocks the caller. All host functions of a context
// run on one callback thread.
// Handles are registered: naming one that was never created or was destroyed aborts the process.
//
// Environment (read at load; AIOCUDA_EMU_DEVICES and AIOCUDA_EMU_INIT_ERROR at cuInit):
//   AIOCUDA_EMU_DEVICES (2)            number of devices
//   AIOCUDA_EMU_INIT_ERROR (unset)     cuInit returns this code and leaves the driver uninitialised
//   AIOCUDA_EMU_DRIVER_VERSION (13000) cuDriverGetVersion; cuGetProcAddress hides newer variants
//   AIOCUDA_EMU_QUEUE_DEPTH (1024)     pending (queued + running) items per stream
//   AIOCUDA_EMU_HOSTFN_CAP (56)        pending host functions per context (then enqueues block)
//   AIOCUDA_EMU_QUERY_NS (400)         how long cuEventQuery holds the driver's lock
//   (the two costs default to tests/emu/costs.json's, a GPU's figures once gpu-check measured them)
//   AIOCUDA_EMU_HOSTFN_LATENCY_US (26) dispatch latency before each host function: a host function
//                                      is a round trip through the driver's callback thread, about
//                                      26 us on current GPUs (PyTorch torchcomms PR 1203) and
//                                      about 100 us on an RTX 3080 (velox PR 6096)
//   AIOCUDA_EMU_ABORT_LOG (unset)      a file that each abort's message is appended to, besides
//                                      stderr (read when aborting; scripts/test sets it)
// Controls for tests: section 18.
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "spin.hpp"  // csrc/: header-only, nothing of the package is linked in

#define EXPORT extern "C" __attribute__((visibility("default")))
typedef int CUresult;
typedef void (*CUhostFn)(void*);

namespace {

using aiocuda::cpu_relax;
using Lock = std::lock_guard<std::mutex>;
using ULock = std::unique_lock<std::mutex>;

// ==== 1. Result codes and flags (values from cuda.h) =============================================
enum : CUresult {
    kSuccess = 0, kInvalidValue = 1, kOutOfMemory = 2, kNotInitialized = 3, kNoDevice = 100,
    kInvalidDevice = 101,
    kInvalidContext = 201, kInvalidHandle = 400, kIllegalState = 401, kNotFound = 500,
    kNotReady = 600, kPrimaryContextActive = 708, kContextIsDestroyed = 709,
    kHostMemoryAlreadyRegistered = 712, kHostMemoryNotRegistered = 713, kNotPermitted = 800,
    kNotSupported = 801,
    kCaptureUnsupported = 900, kCaptureInvalidated = 901, kCaptureMerge = 902,
    kCaptureUnmatched = 903, kCaptureUnjoined = 904, kCaptureIsolation = 905,
    kCaptureImplicit = 906, kCapturedEvent = 907, kCaptureWrongThread = 908,
    kJoinedCapture = -2,  // internal: the operation made its stream join a capture
};
constexpr unsigned kStreamNonBlocking = 0x1, kEventWaitExternal = 0x1;
constexpr unsigned kEventBlockingSync = 0x1, kEventDisableTiming = 0x2, kEventInterprocess = 0x4;
constexpr unsigned kSchedMask = 0x7, kSchedSpin = 0x1, kSchedYield = 0x2, kSchedBlocking = 0x4;
constexpr unsigned kCtxFlagsValid = 0xff;  // sched, MAP_HOST, LMEM, COREDUMP x2, SYNC_MEMOPS
// CU_MEMHOSTREGISTER_PORTABLE, _DEVICEMAP, _IOMEMORY, _READ_ONLY
constexpr unsigned kHostRegPortable = 0x1, kHostRegDeviceMap = 0x2, kHostRegIoMemory = 0x4,
                   kHostRegReadOnly = 0x8;
// CU_STREAM_WAIT_VALUE_GEQ, _EQ, _AND, _NOR (the low bits), _FLUSH
constexpr unsigned kWaitGeq = 0x0, kWaitEq = 0x1, kWaitAnd = 0x2, kWaitNor = 0x3, kWaitFlush = 1u << 30;
enum { kCapNone = 0, kCapActive = 1, kCapInvalidated = 2 };
enum { kModeGlobal = 0, kModeThreadLocal = 1, kModeRelaxed = 2 };
enum { kProcSuccess = 0, kProcSymbolNotFound = 1, kProcVersionNotSufficient = 2 };
enum OpKind { kOpKernel, kOpRecord, kOpWait, kOpHostFn, kOpCtxRecord, kOpWaitValue, kOpWriteValue,
              kOpNotify, kOpCaptured, kNumOps };
const char* const kOpNames[kNumOps] = {"kernel", "record", "wait", "hostfn", "ctxrecord", "waitvalue",
                                       "writevalue", "notify", "captured"};

// Every entry point, for per-thread call counts; versioned symbols count under their base name.
#define EMU_ENTRIES(X)                                                                             \
    X(cuInit) X(cuDriverGetVersion) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDeviceGetName)           \
    X(cuDevicePrimaryCtxRetain) X(cuDevicePrimaryCtxRelease) X(cuDevicePrimaryCtxReset)             \
    X(cuDevicePrimaryCtxSetFlags) X(cuDevicePrimaryCtxGetState) X(cuCtxGetCurrent)                  \
    X(cuCtxSetCurrent) X(cuCtxPushCurrent) X(cuCtxPopCurrent) X(cuCtxGetId) X(cuCtxGetDevice)       \
    X(cuCtxSynchronize) X(cuCtxRecordEvent) X(cuStreamCreate) X(cuStreamDestroy) X(cuStreamGetCtx)  \
    X(cuStreamQuery) X(cuStreamSynchronize) X(cuStreamWaitEvent) X(cuLaunchHostFunc)                \
    X(cuStreamBeginCapture) X(cuStreamEndCapture) X(cuStreamIsCapturing) X(cuStreamGetCaptureInfo)  \
    X(cuThreadExchangeStreamCaptureMode) X(cuGraphDestroy) X(cuEventCreate) X(cuEventRecord)        \
    X(cuEventQuery) X(cuEventSynchronize) X(cuEventDestroy) X(cuEventElapsedTime) X(cuGetErrorName) \
    X(cuGetErrorString) X(cuGetProcAddress) X(cuMemHostRegister) X(cuMemHostUnregister)            \
    X(cuMemHostGetDevicePointer) X(cuStreamWaitValue32) X(cuStreamWriteValue32) X(cuStreamGetId)
#define X(n) E_##n,
enum Entry { EMU_ENTRIES(X) kNumEntries };
#undef X
#define X(n) #n,
const char* const kEntryNames[] = {EMU_ENTRIES(X)};
#undef X

int64_t now_ns() {
    using namespace std::chrono;
    return duration_cast<nanoseconds>(steady_clock::now().time_since_epoch()).count();
}
long long env_ll(const char* name, long long dflt) {
    const char* e = std::getenv(name);
    return e && *e ? std::atoll(e) : dflt;
}

// ==== 2. Objects ===================================================================================
struct Ctx;
struct Stream;
struct Capture;

// What an event record captured: complete after `remaining` arrivals (1 for a stream record, one
// per stream for cuCtxRecordEvent). Shared by the event and by every queued item naming it, so an
// event destroyed while pending never leaves an item with a dangling pointer.
struct Mark {
    std::atomic<int> remaining{1};
    std::atomic<bool> done{false};
    std::atomic<int64_t> t_ns{0};
    std::shared_ptr<Capture> cap;  // recorded into a stream capture: a "captured" event
    Stream* cap_src = nullptr;     // the capturing stream (compared, never dereferenced)
    uint64_t cap_at = 0;           // cap_src's node count at the record
    void arrive();
};

struct Event {
    uintptr_t h = 0;
    Ctx* ctx = nullptr;
    unsigned flags = 0;
    std::shared_ptr<Mark> mark;  // null before the first record: "an empty set of work"
};

// A host function from cuLaunchHostFunc to its return (or drop).
struct HostCall {
    CUhostFn fn = nullptr;
    void* ud = nullptr;
    Ctx* ctx = nullptr;
    uint64_t epoch = 0;         // the context's reset epoch at the launch
    std::atomic<int> state{3};  // 3 not admitted, 0 pending, 1 running, 2 finished or dropped
};

using Deps = std::vector<std::pair<std::shared_ptr<Stream>, uint64_t>>;  // (stream, its enq count)

// A host memory range from cuMemHostRegister. Items waiting on a word in it hold a reference, so
// cuMemHostUnregister can tell that the "device" may still read the range.
struct HostReg {
    uintptr_t base = 0;
    size_t size = 0;
    unsigned flags = 0;
    Ctx* ctx = nullptr;  // current at the registration (a reset of it forgets the range)
};

struct Item {
    OpKind kind = kOpKernel;
    long long usec = 0;              // kernel
    std::shared_ptr<Mark> mark;      // record, ctxrecord, wait
    std::shared_ptr<HostCall> call;  // hostfn
    std::shared_ptr<HostReg> reg;    // waitvalue: the range holding the word
    const uint32_t* word = nullptr;  // waitvalue: read; writevalue: written
    int fd = -1;                     // notify: the eventfd written
    uint32_t value = 0;
    unsigned cond = kWaitGeq;
    Deps deps;  // legacy-stream implicit synchronization
};

struct Stream {
    uintptr_t h = 0;  // 0 for a legacy stream
    unsigned long long id = 0;  // cuStreamGetId
    Ctx* ctx = nullptr;
    unsigned flags = 0;
    bool legacy = false;
    std::mutex mu;
    std::condition_variable work_cv, room_cv;
    std::deque<Item> q;                      // queued, not started
    int pending = 0;                         // queued + running
    bool destroyed = false, exited = false;  // cuStreamDestroy: drain, then the worker exits
    std::atomic<int> nqueued{0};
    std::atomic<uint64_t> enq{0}, done{0};  // items pushed; items finished or dropped (FIFO)
    std::atomic<bool> dead{false};          // destroyed by a primary-context reset
    std::array<std::atomic<uint64_t>, kNumOps> ops{};
    std::shared_ptr<Capture> cap;  // capture state (S.mu)
    uint64_t cap_nodes = 0;        // nodes this stream added to its capture
    bool joined = true;            // its last node was waited on by another stream of the capture
    bool aborted() const;
};

struct Capture {
    uint64_t id = 0, nodes = 0;
    int status = kCapActive, mode = kModeGlobal;
    std::thread::id thread;
    Stream* origin = nullptr;
    std::vector<std::shared_ptr<Stream>> members;  // origin first, then streams that joined
    uintptr_t graph = 0;                           // created at the begin, given at the end
};

struct Graph {
    uint64_t nodes = 0;
    bool capturing = true;
};

// Contexts are never freed (few, and a CUcontext handle must stay valid across resets).
struct Ctx {
    int dev = 0;
    bool primary = true;
    std::atomic<unsigned long long> id{0};
    std::atomic<uint64_t> epoch{0};  // bumped by every reset
    std::atomic<int> sticky{0};
    std::atomic<unsigned> flags{0};  // cuDevicePrimaryCtxSetFlags
    std::atomic<bool> active{false};
    int refs = 0;                               // primary retains (S.mu)
    std::set<std::shared_ptr<Stream>> streams;  // streams with a worker, legacy included (S.mu)
    std::shared_ptr<Stream> legacy;             // created on first use (S.mu)
    std::mutex hmu;                             // host functions: one callback thread
    std::condition_variable hcv, cap_cv;
    std::deque<std::shared_ptr<HostCall>> hq;
    int hpending = 0;  // admitted, not finished
    bool hthread = false;
};

struct State {
    std::mutex mu;  // registries, context stream lists, captures; never held while blocking
    // The driver's lock as a host function sees it: held while one runs, and taken by every
    // stateful entry point. Choice, from NVIDIA's account of numba-cuda issue 317: stream
    // callbacks call Python "while holding the CUDA driver lock in a CUDA driver managed thread.
    // Then if another thread, i.e. the main Python thread, is ever trying to acquire the CUDA
    // driver lock without releasing the GIL, it leads to a potential deadlock". cuda.h says
    // nothing of it; a Python host function waiting for the GIL then stalls every driver call.
    std::mutex drv;
    std::atomic<bool> init{false}, forked{false};
    int ndev = 0, driver_version = 13000;
    std::vector<Ctx*> primary;  // by device
    std::set<Ctx*> ctxs;
    std::unordered_map<uintptr_t, std::shared_ptr<Stream>> streams;
    std::unordered_map<uintptr_t, std::shared_ptr<Event>> events;
    std::unordered_map<uintptr_t, Graph> graphs;
    std::map<uintptr_t, std::shared_ptr<HostReg>> host_regs;  // by base address
    std::set<std::shared_ptr<Capture>> captures;  // ongoing
    uintptr_t next_handle = 0x10000;               // never reused, but for destroyed streams':
    std::deque<uintptr_t> freed_streams;           // handles of streams cuStreamDestroy destroyed
    unsigned long long next_stream_id = 1;
    unsigned long long next_ctx_id = 1, next_capture_id = 1;
    std::atomic<int> failing_stream_creates{0};  // emu_fail_stream_creates: how many are left
    uintptr_t capture_before_mark = 0;  // emu_capture_before_next_mark: the stream handle
    uintptr_t pause_after_mark = 0;     // emu_pause_after_next_mark: the stream handle
    uintptr_t pause_capture_check = 0;  // emu_pause_at_next_capture_check: the stream handle
    std::mutex pause_mu;                // emu_pause_after_next_mark's caller, held in the driver
    std::condition_variable pause_cv;
    bool paused = false, resume = false;
    int64_t query_ns = 400;             // AIOCUDA_EMU_QUERY_NS: cuEventQuery holds the lock this long
    long long dflt_latency_us = 26;
    int dflt_cap = 256, dflt_depth = 1024;
    std::atomic<long long> latency_us{26};
    std::atomic<int> hostfn_cap{56}, depth{1024};
    std::atomic<long long> hostfn_pending{0}, live_threads{0}, emu_threads{0};
    std::atomic<uint64_t> calls_from_host_fns{0}, host_calls{0}, host_ns_total{0}, host_ns_max{0};
    std::mutex pmu, amu;  // progress: each finished item bumps `epoch` and wakes pcv's waiters
    std::condition_variable pcv, acv;  // aborts (sticky error, reset) wake acv's timed sleeps
    std::atomic<uint64_t> epoch{0};
    std::atomic<int> waiters{0};
    State();
};
// Leaked on purpose: detached workers and callback threads may still run while the process exits;
// static destructors must not pull the state from under them.
State& S = *new State;

// The stream workers stand for the GPU (its front end reading the push buffer and the words that
// streams wait on, its engines running kernels): the CPU they spend is no host CPU on a machine
// with a GPU, where a stream waiting on a word of host memory polls it from the device. Each worker
// registers its thread's CPU clock here; emu_device_cpu_ns() sums them, so that a benchmark charges
// the host only what a host pays (process CPU less this). Callback threads are the driver's, on
// the host: not counted here.
struct DeviceClocks {
    std::mutex mu;
    std::vector<clockid_t> live;
    unsigned long long exited_ns = 0;
};
DeviceClocks& dev_clocks = *new DeviceClocks;

unsigned long long cpu_ns_of(clockid_t id) {
    timespec t{};
    if (clock_gettime(id, &t) != 0) return 0;
    return static_cast<unsigned long long>(t.tv_sec) * 1'000'000'000ULL + t.tv_nsec;
}

struct DeviceThread {  // a stream worker's CPU, counted as the device's while it lives and after
    clockid_t id{};
    bool on = false;
    DeviceThread() {
        on = pthread_getcpuclockid(pthread_self(), &id) == 0;
        if (on) { Lock g(dev_clocks.mu); dev_clocks.live.push_back(id); }
    }
    ~DeviceThread() {
        if (!on) return;
        unsigned long long used = cpu_ns_of(CLOCK_THREAD_CPUTIME_ID);
        Lock g(dev_clocks.mu);
        auto& l = dev_clocks.live;
        l.erase(std::find(l.begin(), l.end(), id));
        dev_clocks.exited_ns += used;
    }
};

// ==== 3. Per-thread state, entry bookkeeping, fork =================================================
thread_local std::vector<Ctx*> t_stack;  // back() is current
thread_local int t_mode = kModeGlobal;   // cuThreadExchangeStreamCaptureMode
thread_local bool t_in_host_fn = false, t_emu_thread = false;
thread_local unsigned long long t_blocked_ns = 0;
thread_local std::array<unsigned long long, kNumEntries> t_calls{};
struct ThreadReg {  // counts live threads that called the driver (emu_live("threads"))
    bool on = false;
    ~ThreadReg() { if (on) S.live_threads--; }
};
thread_local ThreadReg t_reg;

// The prologue of every entry point.
CUresult enter(Entry e, bool stateful, bool need_init) {
    if (stateful && S.forked.load()) return kNotInitialized;
    t_calls[e]++;
    if (!t_reg.on && !t_emu_thread) t_reg.on = true, S.live_threads++;
    // cuLaunchHostFunc: "The host function must not make any CUDA API calls. Attempting to use a
    // CUDA API may result in CUDA_ERROR_NOT_PERMITTED, but this is not required." Counted, and the
    // permitted error returned (never kinder than the driver).
    if (t_in_host_fn) return S.calls_from_host_fns++, kNotPermitted;
    if (stateful) { Lock g(S.drv); }  // waits while a host function runs
    // cuInit: "If cuInit() has not been called, any function from the driver API will return
    // CUDA_ERROR_NOT_INITIALIZED."
    if (need_init && !S.init.load()) return kNotInitialized;
    return kSuccess;
}
#define ENTER_(e, stateful, init) \
    if (CUresult r_ = enter(E_##e, stateful, init)) return r_
#define ENTER(e) ENTER_(e, true, true)
#define TRY(expr) \
    if (CUresult r_ = (expr)) return r_

// A forked child. cuda.h says nothing of fork(). Choice: the parent's driver state (threads,
// contexts) does not exist in the child and real drivers refuse to work there, so every stateful
// entry point (cuInit included) returns CUDA_ERROR_NOT_INITIALIZED in the child; cuDriverGetVersion,
// cuGetErrorName/String and cuGetProcAddress still answer (no state; they work before cuInit
// too). S.mu is held across fork() so that the child never inherits it locked.
void atfork_prepare() { S.mu.lock(); }
void atfork_parent() { S.mu.unlock(); }
void atfork_child() { S.forked = true, S.mu.unlock(); }
// What the hardware charges, from tests/emu/costs.json beside the build folder (published figures,
// or a GPU's own from scripts/gpu-check): "key": number. -1 where the file or the key is missing.
long long calibrated(const char* key) {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&calibrated), &info) || !info.dli_fname) return -1;
    std::string path = info.dli_fname;
    path = path.substr(0, path.rfind('/') + 1) + "../costs.json";
    FILE* f = std::fopen(path.c_str(), "r");
    if (!f) return -1;
    char buf[4096];
    size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = 0;
    std::string k = std::string("\"") + key + "\":";
    const char* at = std::strstr(buf, k.c_str());
    return at ? std::llround(std::strtod(at + k.size(), nullptr)) : -1;
}
long long cost(const char* env, const char* key, long long fallback) {
    long long c = calibrated(key);
    return env_ll(env, c >= 0 ? c : fallback);
}

State::State() {  // runs when the library is loaded
    driver_version = static_cast<int>(env_ll("AIOCUDA_EMU_DRIVER_VERSION", 13000));
    latency_us = dflt_latency_us = cost("AIOCUDA_EMU_HOSTFN_LATENCY_US", "hostfn_latency_us", 26);
    query_ns = cost("AIOCUDA_EMU_QUERY_NS", "query_ns", 400);
    hostfn_cap = dflt_cap = static_cast<int>(env_ll("AIOCUDA_EMU_HOSTFN_CAP", 56));
    depth = dflt_depth = static_cast<int>(env_ll("AIOCUDA_EMU_QUEUE_DEPTH", 1024));
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

// ==== 4. Undefined behaviour and handle lookup (S.mu held) ==========================================
// cuStreamGetCtx: "Passing an invalid handle will result in undefined behavior." So for every
// handle the driver is given; the emulator makes it loud and deterministic.
[[noreturn]] void ub(const char* fn, const char* what, const void* h,
                     const char* why = "is not a valid/live handle") {
    const char* fmt = "aiocuda driver emulator: %s: %s %p %s (undefined behaviour in the CUDA "
                      "driver)\n";
    std::fprintf(stderr, fmt, fn, what, h, why);
    std::fflush(stderr);
    // Also to AIOCUDA_EMU_ABORT_LOG: a test runner that captures stderr loses it with the process
    // (scripts/test prints that file when a run fails).
    const char* log = std::getenv("AIOCUDA_EMU_ABORT_LOG");
    if (FILE* f = log && *log ? std::fopen(log, "a") : nullptr) {
        std::fprintf(f, fmt, fn, what, h, why);
        std::fclose(f);
    }
    std::abort();
}

Ctx* current() { return t_stack.empty() ? nullptr : t_stack.back(); }

Ctx* get_ctx(const char* fn, void* h) {
    if (!S.ctxs.count(static_cast<Ctx*>(h))) ub(fn, "context", h);
    return static_cast<Ctx*>(h);
}

// CUDA_ERROR_CONTEXT_IS_DESTROYED: "the context current to the calling thread has been destroyed
// using cuCtxDestroy, or is a primary context which has not yet been initialized." A primary
// context released by its last owner is in that state until it is retained again.
CUresult ctx_err(Ctx* c) {
    return c->primary && !c->active.load() ? kContextIsDestroyed : c->sticky.load();
}
CUresult need_current(Ctx*& c) { return (c = current()) ? ctx_err(c) : kInvalidContext; }

// Rule: every call that involves a faulted context (it is current, or a stream or event of it is
// named) returns its sticky error.
CUresult sticky(Ctx* named) {
    if (int e = named->sticky.load()) return e;
    return current() ? current()->sticky.load() : kSuccess;
}

void worker(std::shared_ptr<Stream> sp);

std::shared_ptr<Stream> new_stream(Ctx* c, unsigned flags, bool legacy) {
    auto s = std::make_shared<Stream>();
    s->ctx = c, s->flags = flags, s->legacy = legacy;
    s->id = S.next_stream_id++;
    // Rule: a destroyed stream's handle is handed out again, as a real driver's allocator hands
    // out a freed address again (after a few others, so that most stale uses still abort): a
    // handle names a stream only while it lives, and cuStreamGetId tells two apart.
    if (!legacy && S.freed_streams.size() >= 4) {  // the fourth most recently freed
        auto it = S.freed_streams.end() - 4;
        S.streams[s->h = *it] = s;
        S.freed_streams.erase(it);
    } else if (!legacy) {
        S.streams[s->h = S.next_handle += 0x10] = s;
    }
    c->streams.insert(s);
    std::thread(worker, s).detach();
    return s;
}

// cuStreamGetCtx: "any of the special streams such as the NULL stream, CU_STREAM_LEGACY and
// CU_STREAM_PER_THREAD [...] Specifying any of the special handles will return the context current
// to the calling thread. If no context is current to the calling thread,
// CUDA_ERROR_INVALID_CONTEXT is returned." Choice: CU_STREAM_PER_THREAD is the legacy stream too
// (stricter: the real per-thread stream does not synchronize with others; aiocuda never uses it).
CUresult get_stream(const char* fn, void* h, std::shared_ptr<Stream>& out) {
    if (reinterpret_cast<uintptr_t>(h) <= 2) {
        Ctx* c;
        TRY(need_current(c));
        if (!c->legacy) c->legacy = new_stream(c, 0, true);
        out = c->legacy;
        return kSuccess;
    }
    auto it = S.streams.find(reinterpret_cast<uintptr_t>(h));
    if (it == S.streams.end()) ub(fn, "stream", h);
    out = it->second;
    return kSuccess;
}

std::shared_ptr<Event> get_event(const char* fn, void* h) {
    auto it = S.events.find(reinterpret_cast<uintptr_t>(h));
    if (it == S.events.end()) ub(fn, "event", h);
    return it->second;
}

// ==== 5. Waiting: progress notifications, spinning, blocking ========================================
void progress_notify() {
    S.epoch++;
    if (S.waiters.load()) {
        Lock g(S.pmu);
        S.pcv.notify_all();
    }
}

// Sleeps until pred() holds; pred() must only read atomics. The timed wait is a safety net.
template <class P>
void wait_progress(P pred) {
    while (!pred()) {
        uint64_t e = S.epoch.load();
        S.waiters++;
        {
            ULock g(S.pmu);
            if (S.epoch.load() == e && !pred()) S.pcv.wait_for(g, std::chrono::milliseconds(50));
        }
        S.waiters--;
    }
}

// As wait_progress, for at most `ns` (a progress notification or the timeout ends it).
template <class P>
void wait_progress_for(int64_t ns, P pred) {
    uint64_t e = S.epoch.load();
    S.waiters++;
    {
        ULock g(S.pmu);
        if (S.epoch.load() == e && !pred()) S.pcv.wait_for(g, std::chrono::nanoseconds(ns));
    }
    S.waiters--;
}

// A condition-variable wait whose duration counts in the calling thread's blocked time.
template <class P>
void blocking_wait(std::condition_variable& cv, ULock& g, P pred) {
    if (pred()) return;
    int64_t t0 = now_ns();
    cv.wait(g, pred);
    t_blocked_ns += now_ns() - t0;
}

void abort_notify() {
    Lock g(S.amu);
    S.acv.notify_all();
}

// The emulated device's timed charges (a kernel's duration, a host function's dispatch latency)
// end when they are due, not up to the kernel's default timer slack later: prctl(2),
// PR_SET_TIMERSLACK, "The default value for the slack is 50 microseconds", which made a 26 us
// host function cost ~100 us here and a 50 us kernel ~130 us (found by review), charging every
// method compared for more than the figures the emulator claims. What remains on top is the
// machine's own wake-up of a sleeping thread, which a GPU does not have (docs/performance.md).
void exact_timers() { prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL); }

// A timed sleep that a sticky error or a reset cuts short.
template <class P>
void sleep_until(int64_t deadline_ns, P aborted) {
    ULock g(S.amu);
    S.acv.wait_until(g, std::chrono::steady_clock::time_point(std::chrono::nanoseconds(deadline_ns)),
                     aborted);
}

enum class How { Spin, Yield, Block };

// cuDevicePrimaryCtxSetFlags: "CU_CTX_SCHED_AUTO: The default value if the flags parameter is zero,
// uses a heuristic based on the number of active CUDA contexts in the process C and the number of
// logical processors in the system P. If C > P, then CUDA will yield to other OS threads when
// waiting for the GPU (CU_CTX_SCHED_YIELD), otherwise CUDA will not yield while waiting for results
// and actively spin on the processor (CU_CTX_SCHED_SPIN)." "CU_CTX_SCHED_BLOCKING_SYNC: Instruct
// CUDA to block the CPU thread on a synchronization primitive when waiting for the GPU to finish
// work." (S.mu held)
How sched_of(Ctx* c) {
    unsigned f = c->flags.load() & kSchedMask;
    if (f == kSchedBlocking) return How::Block;
    if (f == kSchedYield) return How::Yield;
    if (f == kSchedSpin) return How::Spin;
    long long active = 0;
    for (Ctx* x : S.ctxs) active += x->active.load();
    return active > static_cast<long long>(std::thread::hardware_concurrency()) ? How::Yield : How::Spin;
}

// Waits for pred() as `how` says, counting the time in the calling thread's blocked total.
template <class P>
void wait_for(How how, P pred) {
    if (pred()) return;
    int64_t t0 = now_ns();
    if (how == How::Block) wait_progress(pred);
    while (!pred()) how == How::Spin ? cpu_relax() : (void)sched_yield();
    t_blocked_ns += now_ns() - t0;
}

void Mark::arrive() {
    if (remaining.fetch_sub(1) != 1) return;
    t_ns = now_ns();
    done = true;
    progress_notify();
}

bool Stream::aborted() const { return dead.load() || ctx->sticky.load() != 0; }

// ==== 6. Host functions: one callback thread per context ============================================
// cuLaunchHostFunc: "Host functions without a mandated order (such as in independent streams)
// execute in undefined order and may be serialized." They are: all host functions of a context run
// on one callback thread, in the order their streams reach them, each after the wake-up latency.
// "Note that, in contrast to cuStreamAddCallback, the function will not be called in the event of
// an error in the CUDA context."
void settle_call(HostCall& h) {
    { Lock g(h.ctx->hmu); h.ctx->hpending--; }
    h.ctx->cap_cv.notify_all();
    S.hostfn_pending--;
    progress_notify();
}
void drop_call(HostCall& h) {
    int pending = 0;
    if (h.state.compare_exchange_strong(pending, 2)) settle_call(h);
}
bool call_aborted(const HostCall& h) { return h.ctx->sticky.load() || h.ctx->epoch.load() != h.epoch; }

void host_thread(Ctx* c) {  // lives as long as its context: for ever
    aiocuda::name_this_thread("emu-host-fn");
    exact_timers();
    t_emu_thread = true;
    S.emu_threads++;
    for (;;) {
        std::shared_ptr<HostCall> call;
        {
            ULock g(c->hmu);
            c->hcv.wait(g, [&] { return !c->hq.empty(); });
            call = std::move(c->hq.front());
            c->hq.pop_front();
        }
        if (call->state.load() != 0) continue;  // dropped
        if (long long lat = S.latency_us.load())
            sleep_until(now_ns() + lat * 1000, [&] { return call_aborted(*call); });
        int pending = 0;
        if (call_aborted(*call) || !call->state.compare_exchange_strong(pending, 1)) {
            drop_call(*call);
            continue;
        }
        int64_t t0 = now_ns();
        {
            Lock drv(S.drv);  // the driver's lock, held while the function runs (S.drv)
            t_in_host_fn = true;
            call->fn(call->ud);
            t_in_host_fn = false;
        }
        uint64_t ns = static_cast<uint64_t>(now_ns() - t0), m = S.host_ns_max.load();
        S.host_calls++, S.host_ns_total += ns;
        while (ns > m && !S.host_ns_max.compare_exchange_weak(m, ns)) {
        }
        call->state = 2;
        settle_call(*call);
    }
}

void hand_to_host_thread(const std::shared_ptr<HostCall>& call) {
    Ctx* c = call->ctx;
    bool start;
    {
        Lock g(c->hmu);
        c->hq.push_back(call);
        start = !c->hthread;
        c->hthread = true;
    }
    if (start) std::thread(host_thread, c).detach();
    c->hcv.notify_one();
}

// Rule: pending host functions per context are capped (AIOCUDA_EMU_HOSTFN_CAP); cuLaunchHostFunc
// blocks while the cap is reached, and so does every other enqueue of the context (admit_work).
// cuda.h gives no number; a measurement does: launches "issued to another stream and hosted by
// another thread" blocked once 57 host functions were pending (NVIDIA developer forums, "Do
// asynchronous activities issued to different streams share the same queue?", topic 220629;
// "hangs if THIS >= 57"), hence the default of 56 pending.
CUresult admit_work(Ctx* c) {
    ULock g(c->hmu);
    uint64_t epoch = c->epoch.load();
    blocking_wait(c->cap_cv, g, [&] {
        return c->hpending < S.hostfn_cap.load() || c->sticky.load() || c->epoch.load() != epoch;
    });
    if (c->epoch.load() != epoch) return kContextIsDestroyed;
    if (int e = c->sticky.load()) return e;
    return kSuccess;
}

CUresult admit_call(HostCall& h) {
    Ctx* c = h.ctx;
    ULock g(c->hmu);
    blocking_wait(c->cap_cv, g, [&] { return c->hpending < S.hostfn_cap.load() || call_aborted(h); });
    if (c->epoch.load() != h.epoch) return kContextIsDestroyed;
    if (int e = c->sticky.load()) return e;
    c->hpending++, S.hostfn_pending++;
    h.state = 0;
    return kSuccess;
}

// ==== 7. Streams: bounded FIFO queues and their workers =============================================
// An item that will never run: its host function is settled (never called); a context-wide record
// on a stream that already finished everything counts that stream as done.
void discard(Item& it, bool stream_drained) {
    if (it.call) drop_call(*it.call);
    if (stream_drained && it.kind == kOpCtxRecord) it.mark->arrive();
}

// Rule: each stream holds at most AIOCUDA_EMU_QUEUE_DEPTH pending items (queued + running); an
// enqueue on a full stream blocks the calling thread until there is room. Returns the sticky code,
// or CUDA_ERROR_CONTEXT_IS_DESTROYED if a reset destroyed the stream while the caller waited
// (Choice: the call was in flight, so it is not the use of a dead handle).
CUresult push(Stream& s, Item it) {
    ULock g(s.mu);
    blocking_wait(s.room_cv, g, [&] { return s.pending < S.depth.load() || s.aborted() || s.exited; });
    CUresult r = s.dead.load() ? kContextIsDestroyed : s.ctx->sticky.load();
    if (r || s.exited) {
        bool drained = s.exited && !r;
        g.unlock();
        discard(it, drained);
        return r;
    }
    s.q.push_back(std::move(it));
    s.pending++, s.nqueued++, s.enq++;
    g.unlock();
    s.work_cv.notify_one();
    return kSuccess;
}

// Drops everything queued (a sticky error or a reset); the running item notices Stream::aborted().
// Choice: dropped records never complete, so a wait on them from another context's stream (which
// cuStreamWaitEvent allows) blocks that stream, as a GPU waiting on a semaphore nobody releases.
void drop_queue(Stream& s) {
    std::deque<Item> q;
    {
        Lock g(s.mu);
        q.swap(s.q);
        s.nqueued = 0;
        s.pending -= static_cast<int>(q.size());
        s.done += q.size();
    }
    s.room_cv.notify_all();
    s.work_cv.notify_all();
    for (Item& it : q) discard(it, false);
    progress_notify();
}

bool all_done(const Deps& deps) {
    for (auto& d : deps)
        if (d.first->done.load() < d.second) return false;
    return true;
}

// cuStreamWaitValue32: "By default, the condition is to wait for (int32_t)(*addr - value) >= 0, a
// cyclic greater-or-equal." CU_STREAM_WAIT_VALUE_EQ: "Wait until *addr == value."
// CU_STREAM_WAIT_VALUE_AND: "Wait until (*addr & value) != 0." CU_STREAM_WAIT_VALUE_NOR: "Wait until
// ~(*addr | value) != 0."
bool wait_value_met(uint32_t word, uint32_t value, unsigned cond) {
    switch (cond) {
        case kWaitEq: return word == value;
        case kWaitAnd: return (word & value) != 0;
        case kWaitNor: return ~(word | value) != 0;
        default: return static_cast<int32_t>(word - value) >= 0;
    }
}
// Choice: how often a waiting stream reads a word that a host thread may write: every 20 us at
// first, then less often the longer the wait lasts (a sixteenth of the time waited, at most every
// 1 ms), so that a gate held for seconds does not cost the machine a core. A stream's write wakes
// it at once. A GPU polls without host CPU: this thread's CPU is the device's (DeviceClocks).
constexpr int64_t kWaitValuePollMinNs = 20'000, kWaitValuePollMaxNs = 1'000'000;

void run_item(Stream& s, Item& it) {
    wait_progress([&] { return s.aborted() || all_done(it.deps); });
    if (s.aborted()) return discard(it, false);
    switch (it.kind) {
        case kOpKernel:  // a fault or a reset aborts a running kernel
            sleep_until(now_ns() + it.usec * 1000, [&] { return s.aborted(); });
            break;
        case kOpRecord:
        case kOpCtxRecord:
            it.mark->arrive();
            break;
        case kOpWait:
            wait_progress([&] { return s.aborted() || it.mark->done.load(); });
            break;
        case kOpWaitValue: {
            // The front end polls the word in host memory, as a GPU polls mapped pinned memory. A
            // write by a stream (cuStreamWriteValue32) wakes it at once: a GPU sees its own
            // writes within a microsecond or two. A write by a host thread notifies nothing, so it
            // also checks again after a short sleep (a GPU would see it sooner: the emulator's
            // one lag, on host writes only).
            int64_t t0 = now_ns();
            auto met = [&] {
                return s.aborted() || wait_value_met(__atomic_load_n(it.word, __ATOMIC_ACQUIRE), it.value, it.cond);
            };
            while (!met()) {
                int64_t waited = now_ns() - t0;
                int64_t nap = std::min(kWaitValuePollMaxNs, std::max(kWaitValuePollMinNs, waited / 16));
                wait_progress_for(nap, met);
            }
            break;
        }
        case kOpWriteValue:
            // cuStreamWriteValue32 (CU_STREAM_WRITE_VALUE_DEFAULT): "Normally, cuStreamWriteValue32
            // will provide a memory fence before the write". The write is visible to the host at
            // once, as a write to mapped pinned memory over PCIe is (about 1 us on a GPU).
            __atomic_store_n(const_cast<uint32_t*>(it.word), it.value, __ATOMIC_RELEASE);
            break;
        case kOpNotify: {  // emu_enqueue_notify: no driver counterpart
            uint64_t one = 1;
            while (::write(it.fd, &one, sizeof one) < 0 && errno == EINTR) {}
            break;
        }
        case kOpHostFn:
            // cuLaunchHostFunc: "The function will be called after currently enqueued work and will
            // block work added after it." The stream waits until the function has returned.
            hand_to_host_thread(it.call);
            wait_progress([&] { return s.aborted() || it.call->state.load() == 2; });
            break;
        default:
            break;
    }
}

void worker(std::shared_ptr<Stream> sp) {
    aiocuda::name_this_thread("emu-stream");
    exact_timers();
    t_emu_thread = true;
    S.emu_threads++;
    DeviceThread device_cpu;
    Stream& s = *sp;
    for (;;) {
        // Like a GPU front end polling its push buffer, spin briefly before sleeping, so that a
        // burst of launches does not pay a futex wake each. A GPU polls with no host CPU: the
        // spin gives its CPU to any host thread ready to run (sched_yield every 64 pauses), or
        // on a machine with few cores the emulated device would hold back the wake-up of
        // whatever host thread its work just released (on 2 cores: tens of microseconds at the
        // median, paid by every way of waiting, the loop's own wake-up included).
        for (int i = 0; i < 4096 && s.nqueued.load() == 0 && !s.dead.load(); ++i) {
            cpu_relax();
            if ((i & 63) == 63) sched_yield();
        }
        Item it;
        {
            ULock g(s.mu);
            s.work_cv.wait(g, [&] { return !s.q.empty() || s.dead.load() || s.destroyed; });
            if (s.q.empty()) {  // destroyed and drained, or dead: leave (lock order S.mu, s.mu)
                g.unlock();
                Lock gs(S.mu), g2(s.mu);
                if (!s.q.empty()) continue;
                s.exited = true;
                s.room_cv.notify_all();
                s.ctx->streams.erase(sp);
                if (s.ctx->legacy == sp) s.ctx->legacy.reset();
                break;
            }
            it = std::move(s.q.front());
            s.q.pop_front();
            s.nqueued--;
        }
        run_item(s, it);
        it = Item{};  // release what the item held before it counts as done
        { Lock g(s.mu); s.pending--, s.done++; }
        s.room_cv.notify_one();
        progress_notify();
    }
    S.emu_threads--;
}

// ==== 8. Stream capture (S.mu held) ===============================================================
// cuThreadExchangeStreamCaptureMode: "CU_STREAM_CAPTURE_MODE_GLOBAL: This is the default mode. If
// the local thread has an ongoing capture sequence that was not initiated with
// CU_STREAM_CAPTURE_MODE_RELAXED at cuStreamBeginCapture, or if any other thread has a concurrent
// capture sequence initiated with CU_STREAM_CAPTURE_MODE_GLOBAL, this thread is prohibited from
// potentially unsafe API calls. CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: If the local thread has an
// ongoing capture sequence not initiated with CU_STREAM_CAPTURE_MODE_RELAXED, it is prohibited from
// potentially unsafe API calls. Concurrent capture sequences in other threads are ignored.
// CU_STREAM_CAPTURE_MODE_RELAXED: The local thread is not prohibited from potentially unsafe API
// calls."
// Choice (cuda.h lists none): the potentially unsafe calls are cuEventQuery, cuEventSynchronize,
// cuStreamQuery, cuStreamSynchronize and cuCtxSynchronize (PyTorch's NCCL watchdog broke captures
// with cudaEventQuery from another thread, pytorch#104555), and cuMemHostRegister and
// cuMemHostUnregister (vllm#46933: cudaHostRegister during a capture returned
// cudaErrorStreamCaptureUnsupported). cuStreamCreate and cuEventCreate are
// not (capture does not observe them and a replay does not depend on them). A prohibited call
// returns CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates the conflicting captures.
void invalidate(Capture& cap) { if (cap.status == kCapActive) cap.status = kCapInvalidated; }

CUresult unsafe_call() {
    bool hit = false;
    for (auto& cap : S.captures) {
        bool own = cap->thread == std::this_thread::get_id(), conflict = false;
        if (t_mode == kModeGlobal)
            conflict = own ? cap->mode != kModeRelaxed : cap->mode == kModeGlobal;
        else if (t_mode == kModeThreadLocal)
            conflict = own && cap->mode != kModeRelaxed;
        if (conflict) invalidate(*cap), hit = true;
    }
    return hit ? kCaptureUnsupported : kSuccess;
}

// Invalidates (if `inv`) the ongoing captures with a stream matching `pred`; true if there was one.
template <class P>
bool captures_with(P pred, bool inv) {
    bool hit = false;
    for (auto& cap : S.captures)
        for (auto& m : cap->members)
            if (pred(*m)) {
                if (inv) invalidate(*cap);
                hit = true;
            }
    return hit;
}

// cuStreamIsCapturing: "When a blocking stream is capturing, the legacy stream is in an unusable
// state until the blocking stream capture is terminated. The legacy stream is not supported for
// stream capture, but attempted use would have an implicit dependency on the capturing stream(s)."
// CUDA_ERROR_STREAM_CAPTURE_IMPLICIT: "a disallowed implicit dependency on a current capture
// sequence from cudaStreamLegacy." Any use of the legacy stream (enqueue, query, synchronize)
// returns it and invalidates those captures. Choice: whatever their mode (cuda.h exempts none).
// Only cuStreamIsCapturing/GetCaptureInfo leave them valid ("The blocking stream capture is not
// invalidated.").
CUresult legacy_implicit(const Stream& s, bool inv) {
    if (!s.legacy) return kSuccess;
    auto blocking = [&](const Stream& m) { return m.ctx == s.ctx && !(m.flags & kStreamNonBlocking); };
    return captures_with(blocking, inv) ? kCaptureImplicit : kSuccess;
}

// cuCtxRecordEvent: "The API will return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED if the specified
// context hCtx has a stream in the capture mode. In such a case, the call will invalidate all the
// conflicting captures." Choice: cuCtxSynchronize follows the same rule, in every mode (it would
// wait on a stream whose work is not executed), as reported of the real driver: NVIDIA/TensorRT
// issue 2888 (cudaDeviceSynchronize in one thread fails with 900 and breaks another thread's
// capture "regardless of the modes"), ROCm/rocm-systems PR 4508 (measured on an RTX PRO 4000:
// cudaDeviceSynchronize from another thread during a global capture on the same GPU, 900 and
// the capture invalidated).
CUresult ctx_capturing(Ctx* c) {
    return captures_with([&](const Stream& m) { return m.ctx == c; }, true) ? kCaptureUnsupported
                                                                           : kSuccess;
}

bool ongoing(const std::shared_ptr<Capture>& cap) { return cap && S.captures.count(cap); }

// CUDA_ERROR_CAPTURED_EVENT: "the operation is not permitted on an event which was last recorded
// in a capturing stream." cuThreadExchangeStreamCaptureMode (relaxed): "the thread is still
// prohibited from API calls which necessarily conflict with stream capture, for example,
// attempting cuEventQuery on an event that was last recorded inside a capture sequence."
// Choice: an ongoing capture is invalidated too.
CUresult captured_event(const std::shared_ptr<Mark>& m) {
    if (!m || !m->cap) return kSuccess;
    if (ongoing(m->cap)) invalidate(*m->cap);
    return kCapturedEvent;
}

void end_capture(const std::shared_ptr<Capture>& cap) {
    S.captures.erase(cap);
    for (auto& m : cap->members) m->cap.reset(), m->cap_nodes = 0, m->joined = true;
}

// ==== 9. Faults and resets ==========================================================================
void drop_host_queue(Ctx* c) {
    std::deque<std::shared_ptr<HostCall>> q;
    { Lock g(c->hmu); q.swap(c->hq); }
    for (auto& h : q) drop_call(*h);
    c->cap_cv.notify_all();
}

std::vector<std::shared_ptr<Stream>> streams_of(Ctx* c) { return {c->streams.begin(), c->streams.end()}; }

void abort_ctx(Ctx* c, const std::vector<std::shared_ptr<Stream>>& ss) {
    for (auto& s : ss) drop_queue(*s);
    drop_host_queue(c);
    abort_notify();
    progress_notify();
}

// Rule 6, a sticky error as after a faulting kernel: the context's queued and running work is
// dropped, its host functions are never called again, every later call involving it returns the
// code; other contexts go on. cuda.h (CUDA_ERROR_ILLEGAL_ADDRESS): "This leaves the process in an
// inconsistent state and any further CUDA work will return the same error. To continue using CUDA,
// the process must be terminated and relaunched." Choice: cuDevicePrimaryCtxReset recovers (what
// frameworks try); the emulator cannot model "relaunch".
void fault(Ctx* c, int code) {
    std::vector<std::shared_ptr<Stream>> ss;
    {
        Lock g(S.mu);
        c->sticky = code;
        ss = streams_of(c);
    }
    abort_ctx(c, ss);
}

// cuDevicePrimaryCtxReset: "Destroy all allocations and reset all state on the primary context.
// Explicitly destroys and cleans up all resources associated with the current device in the
// current process. Note that it is responsibility of the calling function to ensure that no other
// module in the process is using the device any more. [...] Resetting the primary context does not
// release it, an application that has retained the primary context should explicitly release its
// usage."
// Chosen semantics: the context's streams and events are destroyed (later use of their handles
// aborts), their pending work is dropped (host functions never called), ongoing captures on its
// streams end, host memory registered while it was current is no longer registered, the sticky
// error is cleared. The CUcontext handle value stays the same (it was retained, not released) but
// the context gets a NEW cuCtxGetId id ("unique for the life of the program for this instance of
// CUDA"): code detects a reset by comparing ids. (S.mu held; abort_ctx takes only stream, host and
// progress locks.)
void reset_ctx(Ctx* c) {
    c->epoch++;
    c->id = S.next_ctx_id++;
    auto ss = streams_of(c);
    for (auto& s : ss) s->dead = true;
    c->streams.clear();
    c->legacy.reset();
    for (auto it = S.streams.begin(); it != S.streams.end();)
        it = it->second->ctx == c ? S.streams.erase(it) : std::next(it);
    for (auto it = S.events.begin(); it != S.events.end();)
        it = it->second->ctx == c ? S.events.erase(it) : std::next(it);
    for (auto it = S.host_regs.begin(); it != S.host_regs.end();)
        it = it->second->ctx == c ? S.host_regs.erase(it) : std::next(it);
    for (auto& cap : std::vector<std::shared_ptr<Capture>>(S.captures.begin(), S.captures.end()))
        if (std::any_of(cap->members.begin(), cap->members.end(), [&](auto& m) { return m->ctx == c; }))
            S.graphs.erase(cap->graph), end_capture(cap);
    c->sticky = 0;
    abort_ctx(c, ss);
}

// ==== 10. The common path of every stream operation ================================================
// Legacy-stream implicit synchronization, both directions: work on the legacy stream waits for all
// prior work of the context's blocking streams, and work on a blocking stream waits for all prior
// legacy work. CU_STREAM_NON_BLOCKING: "work running in the created stream may run concurrently
// with work in stream 0 (the NULL stream), and [...] the created stream should perform no implicit
// synchronization with stream 0."
void add_dep(Deps& deps, const std::shared_ptr<Stream>& o) {
    uint64_t e = o->enq.load();
    if (o->done.load() < e) deps.emplace_back(o, e);
}
void implicit_deps(Stream& s, Deps& deps) {
    if (s.flags & kStreamNonBlocking) return;
    if (!s.legacy) {
        if (s.ctx->legacy) add_dep(deps, s.ctx->legacy);
        return;
    }
    for (auto& o : s.ctx->streams)
        if (!o->legacy && !(o->flags & kStreamNonBlocking)) add_dep(deps, o);
}

// Resolves the stream, applies the error and capture rules, lets `build` fill the item (it may
// refuse), then records the item into the stream's capture or pushes it (blocking on a full
// queue). cuStreamBeginCapture: "When a stream is in capture mode, all operations pushed into the
// stream will not be executed, but will instead be captured into a graph".
void begin_capture(const std::shared_ptr<Stream>& s, int mode, std::thread::id thread);

// The caller stays in the driver until emu_resume() (emu_paused() says so meanwhile).
void stay_in_driver() {
    ULock g(S.pause_mu);
    S.paused = true;
    S.pause_cv.notify_all();
    S.pause_cv.wait(g, [] { return S.resume; });
    S.resume = S.paused = false;
}

template <class B>
CUresult submit(const char* fn, void* hs, OpKind kind, B build) {
    std::shared_ptr<Stream> s;
    Item it;
    it.kind = kind;
    bool pause = false;
    // emu_pause_after_next_mark: the caller stays in the driver after its mark was enqueued, as a
    // slow call would keep it (a test then acts in that window), until emu_resume().
    struct PauseAfter {
        bool& on;
        ~PauseAfter() {
            if (on) stay_in_driver();
        }
    } pause_after{pause};
    {
        Lock g(S.mu);
        TRY(get_stream(fn, hs, s)); TRY(sticky(s->ctx));
        if ((kind == kOpRecord || kind == kOpWriteValue) && S.capture_before_mark &&
            S.capture_before_mark == reinterpret_cast<uintptr_t>(hs) && !s->cap && !s->legacy) {
            // emu_capture_before_next_mark: another thread began a capture just now, between the
            // caller's capture check and this mark.
            S.capture_before_mark = 0;
            begin_capture(s, kModeRelaxed, std::thread::id());
        }
        if ((kind == kOpRecord || kind == kOpWriteValue) && S.pause_after_mark &&
            S.pause_after_mark == reinterpret_cast<uintptr_t>(hs)) {
            S.pause_after_mark = 0;
            pause = true;
        }
        if (s->cap) {
            // Choice: once invalidated, more work on the capturing stream fails with
            // CUDA_ERROR_STREAM_CAPTURE_INVALIDATED ("the current capture sequence on the stream has
            // been invalidated due to a previous error").
            if (s->cap->status != kCapActive) return kCaptureInvalidated;
            TRY(build(s, it, true));
            s->ops[kind]++, s->ops[kOpCaptured]++;
            if (kind == kOpKernel || kind == kOpHostFn || kind == kOpWaitValue ||
                kind == kOpWriteValue)  // graph nodes (a memop node for the stream memory ops)
                s->cap->nodes++, s->cap_nodes++, s->joined = false;
            return kSuccess;
        }
        TRY(legacy_implicit(*s, true));
        if (CUresult r = build(s, it, false)) return r == kJoinedCapture ? kSuccess : r;
        s->ops[kind]++;
        implicit_deps(*s, it.deps);
        if (it.call) it.call->epoch = s->ctx->epoch.load();
    }
    if (it.call) {
        TRY(admit_call(*it.call));
    } else {
        TRY(admit_work(s->ctx));
    }
    return push(*s, std::move(it));
}

// What "all the work of stream s so far" means. Choice: for the legacy stream it includes the
// prior work of the context's blocking streams (the legacy stream synchronizes with them).
Deps snapshot(const std::shared_ptr<Stream>& s) {
    Deps out{{s, s->enq.load()}};
    if (s->legacy)
        for (auto& o : s->ctx->streams)
            if (!o->legacy && !(o->flags & kStreamNonBlocking)) out.emplace_back(o, o->enq.load());
    return out;
}

// Shared part of cuStreamQuery and cuStreamSynchronize (S.mu held). Choice: querying or
// synchronizing the capturing stream itself fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED ("the
// operation is not permitted when the stream is capturing") and invalidates the capture.
CUresult stream_rules(const char* fn, void* h, std::shared_ptr<Stream>& s) {
    TRY(get_stream(fn, h, s)); TRY(sticky(s->ctx)); TRY(unsafe_call());
    if (s->cap) return invalidate(*s->cap), kCaptureUnsupported;
    return legacy_implicit(*s, true);
}

// The result of a wait on context `c` that began at reset epoch `epoch`.
CUresult after_wait(Ctx* c, uint64_t epoch) {
    return c->epoch.load() != epoch ? kContextIsDestroyed : c->sticky.load();
}

// Waits for `deps` on context c as its scheduling flags say.
CUresult sync_on(Ctx* c, const Deps& deps, How how, uint64_t epoch) {
    wait_for(how, [&] { return all_done(deps) || after_wait(c, epoch); });
    return after_wait(c, epoch);
}

}  // namespace

// ==== 11. Entry points: initialisation, devices, primary contexts ==================================
EXPORT CUresult cuInit(unsigned flags) {
    ENTER_(cuInit, true, false);
    if (flags != 0) return kInvalidValue;  // cuInit: "Currently, the Flags parameter must be 0."
    if (const char* e = std::getenv("AIOCUDA_EMU_INIT_ERROR")) return std::atoi(e);
    Lock g(S.mu);
    if (S.init.load()) return kSuccess;
    int n = static_cast<int>(env_ll("AIOCUDA_EMU_DEVICES", 2));
    if (n <= 0) return kNoDevice;  // Choice: as real drivers do with no device
    for (S.ndev = 0; S.ndev < n; ++S.ndev) {
        Ctx* c = new Ctx;  // never freed, like every context
        c->dev = S.ndev, c->id = S.next_ctx_id++;
        S.ctxs.insert(c);
        S.primary.push_back(c);
    }
    S.init = true;
    return kSuccess;
}

// cuDriverGetVersion: "This function automatically returns CUDA_ERROR_INVALID_VALUE if
// driverVersion is NULL." It needs no cuInit.
EXPORT CUresult cuDriverGetVersion(int* v) {
    ENTER_(cuDriverGetVersion, false, false);
    if (!v) return kInvalidValue;
    *v = S.driver_version;
    return kSuccess;
}

EXPORT CUresult cuDeviceGetCount(int* n) {
    ENTER(cuDeviceGetCount);
    if (!n) return kInvalidValue;
    *n = S.ndev;
    return kSuccess;
}

#define CHECK_DEV(dev) \
    if (dev < 0 || dev >= S.ndev) return kInvalidDevice

EXPORT CUresult cuDeviceGet(int* dev, int ordinal) {
    ENTER(cuDeviceGet);
    if (!dev) return kInvalidValue;
    CHECK_DEV(ordinal);
    *dev = ordinal;
    return kSuccess;
}

EXPORT CUresult cuDeviceGetName(char* name, int len, int dev) {
    ENTER(cuDeviceGetName);
    if (!name || len <= 0) return kInvalidValue;
    CHECK_DEV(dev);
    std::snprintf(name, static_cast<size_t>(len), "aiocuda driver emulator %d", dev);
    return kSuccess;
}

// cuDevicePrimaryCtxRetain: "Once the user successfully retains the primary context, the primary
// context will be active and available to the user until the user releases it with
// cuDevicePrimaryCtxRelease() or resets it with cuDevicePrimaryCtxReset(). Unlike cuCtxCreate() the
// newly retained context is not pushed onto the stack."
EXPORT CUresult cuDevicePrimaryCtxRetain(void** pctx, int dev) {
    ENTER(cuDevicePrimaryCtxRetain);
    if (!pctx) return kInvalidValue;
    CHECK_DEV(dev);
    Lock g(S.mu);
    Ctx* c = S.primary[dev];
    c->refs++;
    c->active = true;
    *pctx = c;
    return kSuccess;
}

// cuDevicePrimaryCtxRelease: "The context is automatically reset once the last reference to it is
// released. [...] Releasing a primary context that has not been previously retained will fail with
// CUDA_ERROR_INVALID_CONTEXT."
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(int dev) {
    ENTER(cuDevicePrimaryCtxRelease); CHECK_DEV(dev);
    Lock g(S.mu);
    Ctx* c = S.primary[dev];
    if (c->refs == 0) return kInvalidContext;
    if (--c->refs == 0) reset_ctx(c), c->active = false;
    return kSuccess;
}
EXPORT CUresult cuDevicePrimaryCtxRelease(int dev) { return cuDevicePrimaryCtxRelease_v2(dev); }

// cuDevicePrimaryCtxReset: "Explicitly destroys and cleans up all resources associated with the
// current device in the current process. [...] Resetting the primary context does not release it";
// and a retained one is "active and available to the user until the user releases it [...] or resets
// it with cuDevicePrimaryCtxReset()" (cuDevicePrimaryCtxRetain). So it is inactive, its references
// kept, until somebody retains it again (as a driver trace shows: cuDevicePrimaryCtxGetState active=0
// after a reset, and the runtime retaining before its next use; lupinemachines/lupine PR 846).
EXPORT CUresult cuDevicePrimaryCtxReset_v2(int dev) {
    ENTER(cuDevicePrimaryCtxReset); CHECK_DEV(dev);
    Lock g(S.mu);
    reset_ctx(S.primary[dev]);
    S.primary[dev]->active = false;
    return kSuccess;
}
EXPORT CUresult cuDevicePrimaryCtxReset(int dev) { return cuDevicePrimaryCtxReset_v2(dev); }

// cuDevicePrimaryCtxSetFlags: "Sets the flags for the primary context on the device overwriting
// perviously set ones. [...] Only one of the scheduling flags can be set".
EXPORT CUresult cuDevicePrimaryCtxSetFlags_v2(int dev, unsigned flags) {
    ENTER(cuDevicePrimaryCtxSetFlags); CHECK_DEV(dev);
    unsigned sched = flags & kSchedMask;
    if ((flags & ~kCtxFlagsValid) || (sched & (sched - 1))) return kInvalidValue;
    S.primary[dev]->flags = flags;
    return kSuccess;
}
// The CUDA 7.0 variant refused an active context (CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE).
EXPORT CUresult cuDevicePrimaryCtxSetFlags(int dev, unsigned flags) {
    if (S.init.load() && dev >= 0 && dev < S.ndev && S.primary[dev]->active.load())
        return kPrimaryContextActive;
    return cuDevicePrimaryCtxSetFlags_v2(dev, flags);
}

EXPORT CUresult cuDevicePrimaryCtxGetState(int dev, unsigned* flags, int* active) {
    ENTER(cuDevicePrimaryCtxGetState);
    if (!flags || !active) return kInvalidValue;
    CHECK_DEV(dev);
    *flags = S.primary[dev]->flags.load();
    *active = S.primary[dev]->active.load();
    return kSuccess;
}

// ==== 12. Entry points: the per-thread context stack and contexts ===================================
// cuCtxGetCurrent: "If no context is bound to the calling CPU thread then *pctx is set to NULL and
// CUDA_SUCCESS is returned." Choice: the stack calls ignore sticky errors (they only manage the
// thread's stack, and code needs them to clean up after a fault).
EXPORT CUresult cuCtxGetCurrent(void** pctx) {
    ENTER(cuCtxGetCurrent);
    if (!pctx) return kInvalidValue;
    *pctx = current();
    return kSuccess;
}

// cuCtxSetCurrent: "If there exists a CUDA context stack on the calling CPU thread, this will
// replace the top of that stack with ctx. If ctx is NULL then this will be equivalent to popping
// the top of the calling CPU thread's CUDA context stack (or a no-op if the calling CPU thread's
// CUDA context stack is empty)."
EXPORT CUresult cuCtxSetCurrent(void* ctx) {
    ENTER(cuCtxSetCurrent);
    if (!ctx) {
        if (!t_stack.empty()) t_stack.pop_back();
        return kSuccess;
    }
    Lock g(S.mu);
    Ctx* c = get_ctx("cuCtxSetCurrent", ctx);
    t_stack.empty() ? t_stack.push_back(c) : (void)(t_stack.back() = c);
    return kSuccess;
}

// cuCtxPushCurrent: "Pushes the given context ctx onto the CPU thread's stack of current contexts."
EXPORT CUresult cuCtxPushCurrent_v2(void* ctx) {
    ENTER(cuCtxPushCurrent);
    if (!ctx) return kInvalidValue;
    Lock g(S.mu);
    t_stack.push_back(get_ctx("cuCtxPushCurrent", ctx));
    return kSuccess;
}
EXPORT CUresult cuCtxPushCurrent(void* ctx) { return cuCtxPushCurrent_v2(ctx); }

EXPORT CUresult cuCtxPopCurrent_v2(void** pctx) {
    ENTER(cuCtxPopCurrent);
    if (t_stack.empty()) return kInvalidContext;
    if (pctx) *pctx = t_stack.back();
    t_stack.pop_back();
    return kSuccess;
}
EXPORT CUresult cuCtxPopCurrent(void** pctx) { return cuCtxPopCurrent_v2(pctx); }

// cuCtxGetId: "The Id is unique for the life of the program for this instance of CUDA. If context
// is supplied as NULL and there is one current, the Id of the current context is returned."
EXPORT CUresult cuCtxGetId(void* ctx, unsigned long long* id) {
    ENTER(cuCtxGetId);
    if (!id) return kInvalidValue;
    Lock g(S.mu);
    Ctx* c = ctx ? get_ctx("cuCtxGetId", ctx) : current();
    if (!c) return kInvalidContext;
    TRY(ctx_err(c));
    *id = c->id.load();
    return kSuccess;
}

// cuCtxGetDevice_v2 (CUDA 13): "If the specified context is NULL, the API will return the current
// context's device."
EXPORT CUresult cuCtxGetDevice_v2(int* dev, void* ctx) {
    ENTER(cuCtxGetDevice);
    if (!dev) return kInvalidValue;
    Lock g(S.mu);
    Ctx* c = ctx ? get_ctx("cuCtxGetDevice_v2", ctx) : nullptr;
    TRY(c ? ctx_err(c) : need_current(c));
    *dev = c->dev;
    return kSuccess;
}
EXPORT CUresult cuCtxGetDevice(int* dev) { return cuCtxGetDevice_v2(dev, nullptr); }

// cuCtxSynchronize: "Blocks until the current context has completed all preceding requested tasks.
// [...] If the context was created with the CU_CTX_SCHED_BLOCKING_SYNC flag, the CPU thread will
// block until the GPU context has finished its work." Otherwise it spins (sched_of). Choice: "all
// preceding requested tasks" includes work still draining from destroyed streams.
// cuCtxSynchronize_v2 (CUDA 13): "If the specified context is NULL, the API will operate on the
// current context."
EXPORT CUresult cuCtxSynchronize_v2(void* ctx) {
    ENTER(cuCtxSynchronize);
    Ctx* c = nullptr;
    Deps snap;
    How how;
    uint64_t epoch;
    {
        Lock g(S.mu);
        if (ctx) c = get_ctx("cuCtxSynchronize_v2", ctx);
        TRY(c ? ctx_err(c) : need_current(c)); TRY(unsafe_call()); TRY(ctx_capturing(c));
        for (auto& s : c->streams) snap.emplace_back(s, s->enq.load());
        how = sched_of(c);
        epoch = c->epoch.load();
    }
    return sync_on(c, snap, how, epoch);
}
EXPORT CUresult cuCtxSynchronize() { return cuCtxSynchronize_v2(nullptr); }

// cuCtxRecordEvent (CUDA 12.5): "Captures in hEvent all the activities of the context hCtx at the
// time of this call. hEvent and hCtx must be from the same CUDA context, otherwise
// CUDA_ERROR_INVALID_HANDLE will be returned. [...] Uses of hCtx after this call do not modify
// hEvent." A context-wide record item goes on every stream of the context (legacy included); the
// event completes when all of them were reached.
EXPORT CUresult cuCtxRecordEvent(void* hctx, void* hev) {
    ENTER(cuCtxRecordEvent);
    std::vector<std::shared_ptr<Stream>> ss;
    auto m = std::make_shared<Mark>();
    Ctx* c = nullptr;
    {
        Lock g(S.mu);
        if (!hctx) return kInvalidContext;  // Choice: cuda.h gives NULL no meaning here
        c = get_ctx("cuCtxRecordEvent", hctx);
        auto ev = get_event("cuCtxRecordEvent", hev);
        if (ev->ctx != c) return kInvalidHandle;
        TRY(ctx_err(c) ? ctx_err(c) : sticky(c)); TRY(ctx_capturing(c));
        ss = streams_of(c);
        m->remaining = static_cast<int>(ss.size()) + 1;  // +1: released after the pushes
        ev->mark = m;
        for (auto& s : ss) s->ops[kOpCtxRecord]++;
    }
    // An enqueue of the context: it waits while the host functions are at their cap, as every
    // other one does (admit_work). A fault or a reset meanwhile leaves the event incomplete.
    CUresult r = admit_work(c);
    for (auto& s : ss) {
        if (r) break;
        Item it;
        it.kind = kOpCtxRecord, it.mark = m;
        r = push(*s, std::move(it));
    }
    m->arrive();
    return r;
}

// ==== 13. Entry points: streams ===================================================================
// cuStreamCreate: "CU_STREAM_DEFAULT: Default stream creation flag. CU_STREAM_NON_BLOCKING:
// Specifies that work running in the created stream may run concurrently with work in stream 0".
EXPORT CUresult cuStreamCreate(void** out, unsigned flags) {
    ENTER(cuStreamCreate);
    if (!out || (flags & ~kStreamNonBlocking)) return kInvalidValue;
    // cuda.h lists CUDA_ERROR_OUT_OF_MEMORY for cuStreamCreate: a stream takes device memory,
    // which a framework's caching allocator may hold all of (emu_fail_stream_creates).
    for (int left = S.failing_stream_creates.load(); left > 0;)
        if (S.failing_stream_creates.compare_exchange_weak(left, left - 1)) return kOutOfMemory;
    Lock g(S.mu);
    Ctx* c;
    TRY(need_current(c));
    *out = reinterpret_cast<void*>(new_stream(c, flags, false)->h);
    return kSuccess;
}

// cuStreamDestroy: "In case the device is still doing work in the stream hStream when
// cuStreamDestroy() is called, the function will return immediately and the resources associated
// with hStream will be released automatically once the device has completed all work in hStream."
// Choices: the special handles get CUDA_ERROR_INVALID_HANDLE; a stream in an ongoing capture is not
// destroyed (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, the capture is invalidated); under a sticky
// error the stream is destroyed and the code returned (so is cuEventDestroy).
EXPORT CUresult cuStreamDestroy_v2(void* h) {
    ENTER(cuStreamDestroy);
    if (reinterpret_cast<uintptr_t>(h) <= 2) return kInvalidHandle;
    std::shared_ptr<Stream> s;
    CUresult r;
    {
        Lock g(S.mu);
        get_stream("cuStreamDestroy", h, s);
        if (s->cap) return invalidate(*s->cap), kCaptureUnsupported;
        S.streams.erase(s->h);
        S.freed_streams.push_back(s->h);
        r = sticky(s->ctx);
    }
    { Lock g(s->mu); s->destroyed = true; }
    s->work_cv.notify_all();
    return r;
}
EXPORT CUresult cuStreamDestroy(void* h) { return cuStreamDestroy_v2(h); }

// cuStreamGetId: "Returns in streamId the unique Id of the stream hStream. The stream handle
// hStream can refer to any of the following: a stream created via any of the CUDA driver APIs [...]
// The special stream CU_STREAM_LEGACY and CU_STREAM_PER_THREAD [...]". cuStreamGetCtx's rule for the
// special handles applies (the current context's legacy stream). Ids are "unique for the life of
// the program" and never reused, unlike handles.
EXPORT CUresult cuStreamGetId(void* h, unsigned long long* id) {
    ENTER(cuStreamGetId);
    if (!id) return kInvalidValue;
    Lock g(S.mu);
    std::shared_ptr<Stream> s;
    TRY(get_stream("cuStreamGetId", h, s));
    *id = s->id;
    return kSuccess;
}

EXPORT CUresult cuStreamGetCtx(void* h, void** pctx) {
    ENTER(cuStreamGetCtx);
    if (!pctx) return kInvalidValue;
    Lock g(S.mu);
    std::shared_ptr<Stream> s;
    TRY(get_stream("cuStreamGetCtx", h, s)); TRY(sticky(s->ctx));
    *pctx = s->ctx;
    return kSuccess;
}
// cuStreamGetCtx_v2 (CUDA 12.5): "If the stream is associated with a regular context, the API
// returns the regular context in pCtx and NULL in pGreenCtx."
EXPORT CUresult cuStreamGetCtx_v2(void* h, void** pctx, void** pgreen) {
    if (!pgreen) return kInvalidValue;
    CUresult r = cuStreamGetCtx(h, pctx);
    if (r == kSuccess) *pgreen = nullptr;
    return r;
}

// cuStreamQuery: "Returns CUDA_SUCCESS if all operations in the stream specified by hStream have
// completed, or CUDA_ERROR_NOT_READY if not."
EXPORT CUresult cuStreamQuery(void* h) {
    ENTER(cuStreamQuery);
    Lock g(S.mu);
    std::shared_ptr<Stream> s;
    TRY(stream_rules("cuStreamQuery", h, s));
    return all_done(snapshot(s)) ? kSuccess : kNotReady;
}

// cuStreamSynchronize: "Waits until the device has completed all operations in the stream
// specified by hStream. If the context was created with the CU_CTX_SCHED_BLOCKING_SYNC flag, the
// CPU thread will block until the stream is finished with all of its tasks." Otherwise it spins.
EXPORT CUresult cuStreamSynchronize(void* h) {
    ENTER(cuStreamSynchronize);
    std::shared_ptr<Stream> s;
    Deps snap;
    How how;
    uint64_t epoch;
    {
        Lock g(S.mu);
        TRY(stream_rules("cuStreamSynchronize", h, s));
        snap = snapshot(s);
        how = sched_of(s->ctx);
        epoch = s->ctx->epoch.load();
    }
    return sync_on(s->ctx, snap, how, epoch);
}

// cuStreamWaitEvent: "Makes all future work submitted to hStream wait for all work captured in
// hEvent. [...] hEvent may be from a different context or device than hStream."
// CU_EVENT_WAIT_EXTERNAL: "Event is captured in the graph as an external event node when performing
// stream capture. This flag is invalid outside of stream capture." cuEventRecord: "Other APIs such
// as cuStreamWaitEvent() use the most recently captured state at the time of the API call".
EXPORT CUresult cuStreamWaitEvent(void* h, void* hev, unsigned flags) {
    ENTER(cuStreamWaitEvent);
    if (flags & ~kEventWaitExternal) return kInvalidValue;
    auto build = [&](const std::shared_ptr<Stream>& sp, Item& it, bool capturing) -> CUresult {
        Stream& s = *sp;
        auto ev = get_event("cuStreamWaitEvent", hev);
        TRY(ev->ctx->sticky.load());
        std::shared_ptr<Mark> m = ev->mark;
        if (m && m->cap) {
            if (!ongoing(m->cap)) return kCapturedEvent;  // Choice: its capture has ended
            if (capturing && s.cap != m->cap) {
                // CUDA_ERROR_STREAM_CAPTURE_MERGE: "the operation would have resulted in a merge of
                // two independent capture sequences."
                invalidate(*s.cap), invalidate(*m->cap);
                return kCaptureMerge;
            }
            if (!capturing) {
                // Waiting on an event recorded in a capture makes the stream join that capture
                // (the fork/join pattern of stream capture); the legacy stream cannot.
                if (s.legacy) return invalidate(*m->cap), kCaptureImplicit;
                m->cap->members.push_back(sp);
                s.cap = m->cap, s.cap_nodes = 0, s.joined = true;  // nothing forked into it yet
                s.ops[kOpWait]++, s.ops[kOpCaptured]++;
                return kJoinedCapture;
            }
            // A join: the recording stream is joined if nothing followed the record.
            for (auto& o : m->cap->members)
                if (o.get() == m->cap_src && o->cap_nodes == m->cap_at) o->joined = true;
            return kSuccess;
        }
        if (capturing) {
            // CUDA_ERROR_STREAM_CAPTURE_ISOLATION: "a dependency would have been created which
            // crosses the capture sequence boundary. Only implicit in-stream ordering dependencies
            // are allowed to cross the boundary." Choice: a never-recorded event creates no
            // dependency and is accepted.
            if (!m || (flags & kEventWaitExternal)) return kSuccess;
            return invalidate(*s.cap), kCaptureIsolation;
        }
        if (flags & kEventWaitExternal) return kInvalidValue;
        it.mark = m ? m : std::make_shared<Mark>();
        if (!m) it.mark->arrive();  // an empty set of work
        return kSuccess;
    };
    return submit("cuStreamWaitEvent", h, kOpWait, build);
}

// cuLaunchHostFunc: "Enqueues a host function to run in a stream. The function will be called
// after currently enqueued work and will block work added after it."
EXPORT CUresult cuLaunchHostFunc(void* h, CUhostFn fn, void* ud) {
    ENTER(cuLaunchHostFunc);
    if (!fn) return kInvalidValue;
    return submit("cuLaunchHostFunc", h, kOpHostFn, [&](const std::shared_ptr<Stream>& s, Item& it, bool) {
        it.call = std::make_shared<HostCall>();
        it.call->fn = fn, it.call->ud = ud, it.call->ctx = s->ctx;
        return kSuccess;
    });
}

// ==== 14. Entry points: stream capture =============================================================
// cuStreamBeginCapture: "Capture may not be initiated if stream is CU_STREAM_LEGACY. Capture must
// be ended on the same stream in which it was initiated, and it may only be initiated if the stream
// is not already in capture mode." Choices (no codes given): the legacy stream ->
// CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, already capturing -> CUDA_ERROR_ILLEGAL_STATE, as the
// runtime reports them.
EXPORT CUresult cuStreamBeginCapture_v2(void* h, int mode) {
    ENTER(cuStreamBeginCapture);
    if (mode < kModeGlobal || mode > kModeRelaxed) return kInvalidValue;
    Lock g(S.mu);
    std::shared_ptr<Stream> s;
    TRY(get_stream("cuStreamBeginCapture", h, s)); TRY(sticky(s->ctx));
    if (s->legacy) return kCaptureUnsupported;
    if (s->cap) return kIllegalState;
    begin_capture(s, mode, std::this_thread::get_id());
    return kSuccess;
}
namespace {
void begin_capture(const std::shared_ptr<Stream>& s, int mode, std::thread::id thread) {  // S.mu held
    auto cap = std::make_shared<Capture>();
    cap->id = S.next_capture_id++, cap->mode = mode, cap->thread = thread;
    cap->origin = s.get();
    cap->members.push_back(s);
    S.graphs[cap->graph = S.next_handle += 0x10] = Graph{};
    S.captures.insert(cap);
    s->cap = cap, s->cap_nodes = 0, s->joined = true;
}
}  // namespace
// The CUDA 10.0 variant had no mode: it behaves as CU_STREAM_CAPTURE_MODE_GLOBAL.
EXPORT CUresult cuStreamBeginCapture(void* h) { return cuStreamBeginCapture_v2(h, kModeGlobal); }

// cuStreamEndCapture: "If capture was invalidated, due to a violation of the rules of stream
// capture, then a NULL graph will be returned. If the mode argument to cuStreamBeginCapture was not
// CU_STREAM_CAPTURE_MODE_RELAXED, this call must be from the same thread as cuStreamBeginCapture."
// CUDA_ERROR_STREAM_CAPTURE_UNJOINED: "the capture sequence contains a fork that was not joined to
// the primary stream." CUDA_ERROR_STREAM_CAPTURE_UNMATCHED: "the capture was not initiated in this
// stream." Choice: a stream that is not capturing -> CUDA_ERROR_ILLEGAL_STATE (as the runtime).
EXPORT CUresult cuStreamEndCapture(void* h, void** graph) {
    ENTER(cuStreamEndCapture);
    if (!graph) return kInvalidValue;
    Lock g(S.mu);
    std::shared_ptr<Stream> s;
    TRY(get_stream("cuStreamEndCapture", h, s)); TRY(sticky(s->ctx));
    std::shared_ptr<Capture> cap = s->cap;
    if (!cap) return kIllegalState;
    if (cap->origin != s.get()) return kCaptureUnmatched;
    if (cap->mode != kModeRelaxed && cap->thread != std::this_thread::get_id()) return kCaptureWrongThread;
    bool unjoined = false;
    for (auto& m : cap->members) unjoined |= m.get() != cap->origin && !m->joined;
    end_capture(cap);
    *graph = nullptr;
    if (cap->status != kCapActive || unjoined) {
        S.graphs.erase(cap->graph);
        return cap->status != kCapActive ? kCaptureInvalidated : kCaptureUnjoined;
    }
    S.graphs[cap->graph] = Graph{cap->nodes, false};
    *graph = reinterpret_cast<void*>(cap->graph);
    return kSuccess;
}

// cuStreamIsCapturing: "Note that, if this is called on CU_STREAM_LEGACY (the "null stream") while a
// blocking stream in the same context is capturing, it will return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
// and *captureStatus is unspecified after the call. The blocking stream capture is not invalidated."
// cuStreamGetCaptureInfo (v3): "If edgeData_out is non-NULL then dependencies_out must be as well."
// Choice: graph nodes are not modelled (no dependencies are reported).
static CUresult capture_info(Entry e, void* h, int* status, unsigned long long* id, void** graph,
                             const void** deps, const void** edges, size_t* ndeps) {
    if (CUresult r = enter(e, true, true)) return r;
    if (!status || (edges && !deps)) return kInvalidValue;
    bool pause = false;
    {
        Lock g(S.mu);
        if (S.pause_capture_check && S.pause_capture_check == reinterpret_cast<uintptr_t>(h)) {
            S.pause_capture_check = 0;
            pause = true;
        }
    }
    if (pause) stay_in_driver();  // before the handle is looked at: a slow entry into the call
    Lock g(S.mu);
    std::shared_ptr<Stream> s;
    TRY(get_stream(kEntryNames[e], h, s)); TRY(sticky(s->ctx)); TRY(legacy_implicit(*s, false));
    *status = s->cap ? s->cap->status : kCapNone;
    if (id) *id = s->cap ? s->cap->id : 0;
    if (graph) *graph = s->cap ? reinterpret_cast<void*>(s->cap->graph) : nullptr;
    if (deps) *deps = nullptr;
    if (edges) *edges = nullptr;
    if (ndeps) *ndeps = 0;
    return kSuccess;
}
EXPORT CUresult cuStreamGetCaptureInfo_v3(void* h, int* status, unsigned long long* id, void** graph,
                                          const void** deps, const void** edges, size_t* ndeps) {
    return capture_info(E_cuStreamGetCaptureInfo, h, status, id, graph, deps, edges, ndeps);
}
EXPORT CUresult cuStreamGetCaptureInfo_v2(void* h, int* status, unsigned long long* id, void** graph,
                                          const void** deps, size_t* ndeps) {
    return capture_info(E_cuStreamGetCaptureInfo, h, status, id, graph, deps, nullptr, ndeps);
}
EXPORT CUresult cuStreamGetCaptureInfo(void* h, int* status, unsigned long long* id) {
    return capture_info(E_cuStreamGetCaptureInfo, h, status, id, nullptr, nullptr, nullptr, nullptr);
}
EXPORT CUresult cuStreamIsCapturing(void* h, int* status) {
    return capture_info(E_cuStreamIsCapturing, h, status, nullptr, nullptr, nullptr, nullptr, nullptr);
}

// cuThreadExchangeStreamCaptureMode: "Sets the calling thread's stream capture interaction mode to
// the value contained in *mode, and overwrites *mode with the previous mode for the thread."
EXPORT CUresult cuThreadExchangeStreamCaptureMode(int* mode) {
    ENTER(cuThreadExchangeStreamCaptureMode);
    if (!mode || *mode < kModeGlobal || *mode > kModeRelaxed) return kInvalidValue;
    std::swap(*mode, t_mode);
    return kSuccess;
}

// cuStreamGetCaptureInfo: "All operations other than destroy and node removal are permitted on the
// graph while the capture sequence is in progress." So destroying it then is refused.
EXPORT CUresult cuGraphDestroy(void* h) {
    ENTER(cuGraphDestroy);
    Lock g(S.mu);
    auto it = S.graphs.find(reinterpret_cast<uintptr_t>(h));
    if (it == S.graphs.end()) ub("cuGraphDestroy", "graph", h);
    if (it->second.capturing) return kInvalidValue;
    S.graphs.erase(it);
    return kSuccess;
}

// ==== 15. Entry points: events ====================================================================
// cuEventCreate: "CU_EVENT_INTERPROCESS must be specified along with CU_EVENT_DISABLE_TIMING."
EXPORT CUresult cuEventCreate(void** out, unsigned flags) {
    ENTER(cuEventCreate);
    if (!out || (flags & ~(kEventBlockingSync | kEventDisableTiming | kEventInterprocess)) ||
        ((flags & kEventInterprocess) && !(flags & kEventDisableTiming)))
        return kInvalidValue;
    Lock g(S.mu);
    Ctx* c;
    TRY(need_current(c));
    auto ev = std::make_shared<Event>();
    ev->ctx = c, ev->flags = flags;
    S.events[ev->h = S.next_handle += 0x10] = ev;
    *out = reinterpret_cast<void*>(ev->h);
    return kSuccess;
}

// cuEventRecord: "hEvent and hStream must be from the same context otherwise
// CUDA_ERROR_INVALID_HANDLE is returned. [...] cuEventRecord() can be called multiple times on the
// same event and will overwrite the previously captured state."
EXPORT CUresult cuEventRecord(void* hev, void* h) {
    ENTER(cuEventRecord);
    return submit("cuEventRecord", h, kOpRecord, [&](const std::shared_ptr<Stream>& s, Item& it,
                                                    bool capturing) -> CUresult {
        auto ev = get_event("cuEventRecord", hev);
        if (ev->ctx != s->ctx) return kInvalidHandle;
        auto m = std::make_shared<Mark>();
        if (capturing) m->cap = s->cap, m->cap_src = s.get(), m->cap_at = s->cap_nodes;
        ev->mark = it.mark = m;
        return kSuccess;
    });
}

// Shared part of cuEventQuery and cuEventSynchronize (S.mu held).
static CUresult event_rules(const char* fn, void* hev, std::shared_ptr<Event>& ev) {
    ev = get_event(fn, hev);
    TRY(sticky(ev->ctx)); TRY(unsafe_call());
    return captured_event(ev->mark);
}

// cuEventQuery: "Returns CUDA_SUCCESS if all captured work has been completed, or
// CUDA_ERROR_NOT_READY if any captured work is incomplete." cuEventRecord: "Before the first call
// to cuEventRecord(), an event represents an empty set of work, so for example cuEventQuery() would
// return CUDA_SUCCESS." It never blocks.
// Cost: a query takes the driver's lock (S.mu stands for it) for AIOCUDA_EMU_QUERY_NS (400 ns by
// default: a record and a query of a timing-disabled event take 0.47 us together, ICLDisco/parsec
// PR 576), so a thread that polls events slows every other thread's driver calls, as on a GPU
// (vLLM moved off busy event polling for this, PR 47081).
EXPORT CUresult cuEventQuery(void* hev) {
    ENTER(cuEventQuery);
    Lock g(S.mu);
    for (int64_t until = now_ns() + S.query_ns; now_ns() < until;) cpu_relax();
    std::shared_ptr<Event> ev;
    TRY(event_rules("cuEventQuery", hev, ev));
    return !ev->mark || ev->mark->done.load() ? kSuccess : kNotReady;
}

// cuEventSynchronize: "Waiting for an event that was created with the CU_EVENT_BLOCKING_SYNC flag
// will cause the calling CPU thread to block until the event has been completed by the device. If
// the CU_EVENT_BLOCKING_SYNC flag has not been set, then the CPU thread will busy-wait until the
// event has been completed by the device."
EXPORT CUresult cuEventSynchronize(void* hev) {
    ENTER(cuEventSynchronize);
    std::shared_ptr<Event> ev;
    std::shared_ptr<Mark> m;
    uint64_t epoch;
    {
        Lock g(S.mu);
        TRY(event_rules("cuEventSynchronize", hev, ev));
        if (!ev->mark) return kSuccess;
        epoch = ev->ctx->epoch.load();
        m = ev->mark;  // under S.mu: a record made meanwhile is not this call's to wait for
    }
    wait_for(ev->flags & kEventBlockingSync ? How::Block : How::Spin,
             [&] { return m->done.load() || after_wait(ev->ctx, epoch); });
    return m->done.load() ? kSuccess : after_wait(ev->ctx, epoch);
}

// cuEventDestroy: "An event may be destroyed before it is complete (i.e., while cuEventQuery() would
// return CUDA_ERROR_NOT_READY). In this case, the call does not block on completion of the event,
// and any associated resources will automatically be released asynchronously at completion."
EXPORT CUresult cuEventDestroy_v2(void* hev) {
    ENTER(cuEventDestroy);
    Lock g(S.mu);
    auto ev = get_event("cuEventDestroy", hev);
    S.events.erase(ev->h);
    return sticky(ev->ctx);
}
EXPORT CUresult cuEventDestroy(void* hev) { return cuEventDestroy_v2(hev); }

// cuEventElapsedTime: "If cuEventRecord() has not been called on either event then
// CUDA_ERROR_INVALID_HANDLE is returned. If cuEventRecord() has been called on both events but one
// or both of them has not yet been completed [...] CUDA_ERROR_NOT_READY is returned. If either
// event was created with the CU_EVENT_DISABLE_TIMING flag, then this function will return
// CUDA_ERROR_INVALID_HANDLE."
EXPORT CUresult cuEventElapsedTime(float* ms, void* ha, void* hb) {
    ENTER(cuEventElapsedTime);
    if (!ms) return kInvalidValue;
    Lock g(S.mu);
    auto a = get_event("cuEventElapsedTime", ha), b = get_event("cuEventElapsedTime", hb);
    TRY(sticky(a->ctx) ? sticky(a->ctx) : sticky(b->ctx));
    if (!a->mark || !b->mark || ((a->flags | b->flags) & kEventDisableTiming)) return kInvalidHandle;
    TRY(captured_event(a->mark) ? kCapturedEvent : captured_event(b->mark));
    if (!a->mark->done.load() || !b->mark->done.load()) return kNotReady;
    *ms = static_cast<float>((b->mark->t_ns.load() - a->mark->t_ns.load()) / 1e6);
    return kSuccess;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// ==== 16. Entry points: registered host memory and waits on a word in it ===========================
namespace {
// The registration that holds all of [p, p + n), or null (S.mu held).
std::shared_ptr<HostReg> find_reg(uintptr_t p, size_t n) {
    auto it = S.host_regs.upper_bound(p);
    if (it == S.host_regs.begin()) return nullptr;
    const std::shared_ptr<HostReg>& r = std::prev(it)->second;
    return p - r->base < r->size && n <= r->size - (p - r->base) ? r : nullptr;
}
}  // namespace

// cuMemHostRegister: "Page-locks the memory range specified by p and bytesize and maps it for the
// device(s) as specified by Flags." "CU_MEMHOSTREGISTER_DEVICEMAP: Maps the allocation into the CUDA
// address space. The device pointer to the memory may be obtained by calling
// cuMemHostGetDevicePointer()." "The memory page-locked by this function must be unregistered with
// cuMemHostUnregister()." Its return codes include CUDA_ERROR_INVALID_CONTEXT,
// CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED and CUDA_ERROR_NOT_SUPPORTED. Choices: a range that
// overlaps a registered one -> CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED; _IOMEMORY and _READ_ONLY
// are not modelled -> CUDA_ERROR_NOT_SUPPORTED (what cuda.h returns where they are unsupported);
// nothing is page-locked (the range stays ordinary memory, which the emulated device reads).
EXPORT CUresult cuMemHostRegister_v2(void* p, size_t bytesize, unsigned flags) {
    ENTER(cuMemHostRegister);
    constexpr unsigned valid = kHostRegPortable | kHostRegDeviceMap | kHostRegIoMemory | kHostRegReadOnly;
    uintptr_t base = reinterpret_cast<uintptr_t>(p);
    if (!p || !bytesize || bytesize > UINTPTR_MAX - base || (flags & ~valid)) return kInvalidValue;
    if (flags & (kHostRegIoMemory | kHostRegReadOnly)) return kNotSupported;
    Lock g(S.mu);
    Ctx* c;
    TRY(need_current(c));
    TRY(unsafe_call());
    auto next = S.host_regs.lower_bound(base);
    if (next != S.host_regs.end() && next->first < base + bytesize) return kHostMemoryAlreadyRegistered;
    if (next != S.host_regs.begin()) {
        const HostReg& prev = *std::prev(next)->second;
        if (prev.base + prev.size > base) return kHostMemoryAlreadyRegistered;
    }
    auto r = std::make_shared<HostReg>();
    r->base = base, r->size = bytesize, r->flags = flags, r->ctx = c;
    S.host_regs[base] = r;
    return kSuccess;
}
// The CUDA 4.0 variant has the same prototype.
EXPORT CUresult cuMemHostRegister(void* p, size_t bytesize, unsigned flags) {
    return cuMemHostRegister_v2(p, bytesize, flags);
}

// cuMemHostUnregister: "Unmaps the memory range whose base address is specified by p, and makes it
// pageable again. The base address must be the same one specified to cuMemHostRegister()." Its
// return codes include CUDA_ERROR_INVALID_CONTEXT and CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED.
// Choice: unmapping a range while a stream's wait still reads a word in it (the wait has not
// finished) would leave the device reading memory that is no longer mapped: undefined behaviour,
// which aborts like a dead handle does.
EXPORT CUresult cuMemHostUnregister(void* p) {
    ENTER(cuMemHostUnregister);
    Lock g(S.mu);
    Ctx* c;
    TRY(need_current(c));
    TRY(unsafe_call());
    auto it = S.host_regs.find(reinterpret_cast<uintptr_t>(p));
    if (!p || it == S.host_regs.end()) return kHostMemoryNotRegistered;
    if (it->second.use_count() > 1)
        ub("cuMemHostUnregister", "host range", p,
           "has a stream wait on a word in it that is not finished");
    S.host_regs.erase(it);
    return kSuccess;
}

// cuMemHostGetDevicePointer: "Passes back the device pointer pdptr corresponding to the mapped, pinned
// host buffer p [...] cuMemHostGetDevicePointer() will fail if the CU_MEMHOSTALLOC_DEVICEMAP flag was
// not specified at the time the memory was allocated" (for registered memory, cuMemHostRegister:
// "The failure is deferred to cuMemHostGetDevicePointer()"). "Flags provides for future releases.
// For now, it must be set to 0." "If all devices visible to the application have a non-zero value
// for the device attribute, the device pointer returned by cuMemHostGetDevicePointer() will match
// the original pointer p." Choices: every emulated device has that attribute
// (CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM), so the device pointer IS the host
// pointer; p outside a registered range, or in one registered without _DEVICEMAP ->
// CUDA_ERROR_INVALID_VALUE (the only failure code cuda.h lists besides context errors).
EXPORT CUresult cuMemHostGetDevicePointer_v2(unsigned long long* pdptr, void* p, unsigned flags) {
    ENTER(cuMemHostGetDevicePointer);
    if (!pdptr || !p || flags != 0) return kInvalidValue;
    Lock g(S.mu);
    Ctx* c;
    TRY(need_current(c));
    auto r = find_reg(reinterpret_cast<uintptr_t>(p), 1);
    if (!r || !(r->flags & kHostRegDeviceMap)) return kInvalidValue;
    *pdptr = reinterpret_cast<uintptr_t>(p);
    return kSuccess;
}

// cuStreamWaitValue32: "Enqueues a synchronization of the stream on the given memory location. Work
// ordered after the operation will block until the given condition on the memory is satisfied. By
// default, the condition is to wait for (int32_t)(*addr - value) >= 0, a cyclic greater-or-equal."
// "If the memory was registered via cuMemHostRegister(), the device pointer should be obtained with
// cuMemHostGetDevicePointer()." CU_STREAM_WAIT_VALUE_FLUSH: "Support for this operation is
// restricted to selected platforms". The wait is an item of the stream like any other: one pending
// operation (the bounded queue counts it), recorded into a capture as a node, dropped by a sticky
// error or a reset; while it runs the stream reads the word again and again (every 20 us, backing
// off to 1 ms: kWaitValuePollMinNs; nothing tells a GPU that the host wrote), and at once when
// a stream writes a word (cuStreamWriteValue32). Choices: addr must be
// 4-byte aligned and its 4 bytes inside a range registered with CU_MEMHOSTREGISTER_DEVICEMAP, else
// CUDA_ERROR_INVALID_VALUE (device memory is not modelled); _FLUSH -> CUDA_ERROR_NOT_SUPPORTED; _NOR
// is supported.
EXPORT CUresult cuStreamWaitValue32_v2(void* h, unsigned long long addr, uint32_t value, unsigned flags) {
    ENTER(cuStreamWaitValue32);
    if (flags & kWaitFlush) return kNotSupported;
    if (flags & ~(kWaitGeq | kWaitEq | kWaitAnd | kWaitNor)) return kInvalidValue;
    auto build = [&](const std::shared_ptr<Stream>&, Item& it, bool) -> CUresult {
        std::shared_ptr<HostReg> r = addr % 4 ? nullptr : find_reg(static_cast<uintptr_t>(addr), 4);
        if (!r || !(r->flags & kHostRegDeviceMap)) return kInvalidValue;
        it.reg = r, it.word = reinterpret_cast<const uint32_t*>(static_cast<uintptr_t>(addr));
        it.value = value, it.cond = flags;
        return kSuccess;
    };
    return submit("cuStreamWaitValue32", h, kOpWaitValue, build);
}
// The CUDA 8.0 variant has the same prototype and conditions.
EXPORT CUresult cuStreamWaitValue32(void* h, unsigned long long addr, uint32_t value, unsigned flags) {
    return cuStreamWaitValue32_v2(h, addr, value, flags);
}

// cuStreamWriteValue32: "Write a value to memory." "If the memory was registered via
// cuMemHostRegister(), the device pointer should be obtained with cuMemHostGetDevicePointer()."
// CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER: "Permits the write to be reordered with writes which were
// issued before it, as a performance optimization. Normally, cuStreamWriteValue32 will provide a
// memory fence before the write". Like a wait, the write is an item of the stream: it happens after
// the stream's earlier work, counts against the bounded queue, is recorded into a capture as a
// node (a replay of the graph would write it again), and is dropped by a sticky error or a reset.
// Choices: addr must be 4-byte aligned and inside a range registered with
// CU_MEMHOSTREGISTER_DEVICEMAP, else CUDA_ERROR_INVALID_VALUE (device memory is not modelled);
// the write is made at once when the item runs (every item runs in order, so the fence holds).
EXPORT CUresult cuStreamWriteValue32_v2(void* h, unsigned long long addr, uint32_t value, unsigned flags) {
    ENTER(cuStreamWriteValue32);
    if (flags & ~1u) return kInvalidValue;
    auto build = [&](const std::shared_ptr<Stream>&, Item& it, bool) -> CUresult {
        std::shared_ptr<HostReg> r = addr % 4 ? nullptr : find_reg(static_cast<uintptr_t>(addr), 4);
        if (!r || !(r->flags & kHostRegDeviceMap)) return kInvalidValue;
        it.reg = r, it.word = reinterpret_cast<const uint32_t*>(static_cast<uintptr_t>(addr));
        it.value = value;
        return kSuccess;
    };
    return submit("cuStreamWriteValue32", h, kOpWriteValue, build);
}
// The CUDA 8.0 variant has the same prototype.
EXPORT CUresult cuStreamWriteValue32(void* h, unsigned long long addr, uint32_t value, unsigned flags) {
    return cuStreamWriteValue32_v2(h, addr, value, flags);
}

// ==== 17. Entry points: errors and cuGetProcAddress ===============================================
namespace {
struct ErrorText {
    CUresult code;
    const char *name, *text;
};
const ErrorText kErrors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {401, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {708, "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE", "primary context active"},
    {709, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed"},
    {712, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED", "part or all of the requested memory range is already mapped"},
    {713, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED", "pointer does not correspond to a registered memory region"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {900, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
    {901, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED", "operation failed due to a previous error during capture"},
    {902, "CUDA_ERROR_STREAM_CAPTURE_MERGE", "operation would result in a merge of separate capture sequences"},
    {903, "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED", "capture was not ended in the same stream as it began"},
    {904, "CUDA_ERROR_STREAM_CAPTURE_UNJOINED", "capturing stream has unjoined work"},
    {905, "CUDA_ERROR_STREAM_CAPTURE_ISOLATION", "dependency created on uncaptured work in another stream"},
    {906, "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT", "operation would make the legacy stream depend on a capturing blocking stream"},
    {907, "CUDA_ERROR_CAPTURED_EVENT", "operation not permitted on an event last recorded in a capturing stream"},
    {908, "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD", "attempt to terminate a thread-local capture sequence from another thread"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};
// cuGetErrorName: "If the error code is not recognized, CUDA_ERROR_INVALID_VALUE will be returned
// and *pStr will be set to the NULL value."
CUresult error_text(CUresult code, const char** s, bool name) {
    if (!s) return kInvalidValue;
    *s = nullptr;
    for (const ErrorText& e : kErrors)
        if (e.code == code) return *s = name ? e.name : e.text, kSuccess;
    return kInvalidValue;
}
}  // namespace

EXPORT CUresult cuGetErrorName(CUresult code, const char** s) {
    ENTER_(cuGetErrorName, false, false);
    return error_text(code, s, true);
}
EXPORT CUresult cuGetErrorString(CUresult code, const char** s) {
    ENTER_(cuGetErrorString, false, false);
    return error_text(code, s, false);
}
EXPORT CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int version,
                                    unsigned long long flags, int* status);
EXPORT CUresult cuGetProcAddress(const char* symbol, void** pfn, int version, unsigned long long flags) {
    return cuGetProcAddress_v2(symbol, pfn, version, flags, nullptr);
}

namespace {
// The variants cudaTypedefs.h declares (PFN_<name>_v<version>) for the entry points implemented
// here: the name asked for, the version that introduced the variant, the function it resolves to.
struct ProcEntry {
    const char* name;
    int version;
    void* fn;
};
#define P(name, version, sym) {#name, version, reinterpret_cast<void*>(&sym)}
const ProcEntry kProcs[] = {
    P(cuGetErrorString, 6000, cuGetErrorString), P(cuGetErrorName, 6000, cuGetErrorName),
    P(cuInit, 2000, cuInit), P(cuDriverGetVersion, 2020, cuDriverGetVersion),
    P(cuDeviceGet, 2000, cuDeviceGet), P(cuDeviceGetCount, 2000, cuDeviceGetCount),
    P(cuDeviceGetName, 2000, cuDeviceGetName), P(cuDevicePrimaryCtxRetain, 7000, cuDevicePrimaryCtxRetain),
    P(cuDevicePrimaryCtxRelease, 7000, cuDevicePrimaryCtxRelease),
    P(cuDevicePrimaryCtxRelease, 11000, cuDevicePrimaryCtxRelease_v2),
    P(cuDevicePrimaryCtxSetFlags, 7000, cuDevicePrimaryCtxSetFlags),
    P(cuDevicePrimaryCtxSetFlags, 11000, cuDevicePrimaryCtxSetFlags_v2),
    P(cuDevicePrimaryCtxGetState, 7000, cuDevicePrimaryCtxGetState),
    P(cuDevicePrimaryCtxReset, 7000, cuDevicePrimaryCtxReset),
    P(cuDevicePrimaryCtxReset, 11000, cuDevicePrimaryCtxReset_v2), P(cuCtxGetId, 12000, cuCtxGetId),
    P(cuCtxPushCurrent, 2000, cuCtxPushCurrent), P(cuCtxPushCurrent, 4000, cuCtxPushCurrent_v2),
    P(cuCtxPopCurrent, 2000, cuCtxPopCurrent), P(cuCtxPopCurrent, 4000, cuCtxPopCurrent_v2),
    P(cuCtxSetCurrent, 4000, cuCtxSetCurrent), P(cuCtxGetCurrent, 4000, cuCtxGetCurrent),
    P(cuCtxGetDevice, 2000, cuCtxGetDevice), P(cuCtxGetDevice, 13000, cuCtxGetDevice_v2),
    P(cuCtxSynchronize, 2000, cuCtxSynchronize), P(cuCtxSynchronize, 13000, cuCtxSynchronize_v2),
    P(cuCtxRecordEvent, 12050, cuCtxRecordEvent), P(cuStreamCreate, 2000, cuStreamCreate),
    P(cuStreamGetCtx, 9020, cuStreamGetCtx), P(cuStreamGetCtx, 12050, cuStreamGetCtx_v2),
    P(cuStreamGetId, 12000, cuStreamGetId),
    P(cuStreamWaitEvent, 3020, cuStreamWaitEvent), P(cuStreamBeginCapture, 10000, cuStreamBeginCapture),
    P(cuStreamBeginCapture, 10010, cuStreamBeginCapture_v2),
    P(cuThreadExchangeStreamCaptureMode, 10010, cuThreadExchangeStreamCaptureMode),
    P(cuStreamEndCapture, 10000, cuStreamEndCapture), P(cuStreamIsCapturing, 10000, cuStreamIsCapturing),
    P(cuStreamGetCaptureInfo, 10010, cuStreamGetCaptureInfo),
    P(cuStreamGetCaptureInfo, 11030, cuStreamGetCaptureInfo_v2),
    P(cuStreamGetCaptureInfo, 12030, cuStreamGetCaptureInfo_v3),
    P(cuStreamQuery, 2000, cuStreamQuery), P(cuStreamSynchronize, 2000, cuStreamSynchronize),
    P(cuStreamDestroy, 2000, cuStreamDestroy), P(cuStreamDestroy, 4000, cuStreamDestroy_v2),
    P(cuEventCreate, 2000, cuEventCreate), P(cuEventRecord, 2000, cuEventRecord),
    P(cuEventQuery, 2000, cuEventQuery), P(cuEventSynchronize, 2000, cuEventSynchronize),
    P(cuEventDestroy, 2000, cuEventDestroy), P(cuEventDestroy, 4000, cuEventDestroy_v2),
    P(cuEventElapsedTime, 2000, cuEventElapsedTime), P(cuEventElapsedTime, 12080, cuEventElapsedTime_v2),
    P(cuLaunchHostFunc, 10000, cuLaunchHostFunc), P(cuGraphDestroy, 10000, cuGraphDestroy),
    P(cuGetProcAddress, 11030, cuGetProcAddress), P(cuGetProcAddress, 12000, cuGetProcAddress_v2),
    P(cuMemHostRegister, 4000, cuMemHostRegister), P(cuMemHostRegister, 6050, cuMemHostRegister_v2),
    P(cuMemHostUnregister, 4000, cuMemHostUnregister),
    P(cuMemHostGetDevicePointer, 3020, cuMemHostGetDevicePointer_v2),
    P(cuStreamWaitValue32, 8000, cuStreamWaitValue32), P(cuStreamWaitValue32, 11070, cuStreamWaitValue32_v2),
    P(cuStreamWriteValue32, 8000, cuStreamWriteValue32),
    P(cuStreamWriteValue32, 11070, cuStreamWriteValue32_v2),
};
#undef P
}  // namespace

// cuGetProcAddress: "For a requested driver symbol, if the specified CUDA version is greater than
// or equal to the CUDA version in which the driver symbol was introduced, this API will return the
// function pointer to the corresponding versioned function. If the specified CUDA version is
// greater than the driver version, the API will return CUDA_ERROR_INVALID_VALUE."
// "CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND - The requested symbol was not found;
// CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT - The requested symbol was found but is not supported
// by cudaVersion specified". Choices: a symbol not found returns CUDA_ERROR_NOT_FOUND with
// *pfn = NULL, as CUDA 12+ drivers do (cuda.h still says CUDA_SUCCESS with a NULL pfn: callers must
// check both). Variants newer than the emulated driver (AIOCUDA_EMU_DRIVER_VERSION) do not exist.
// Per-thread (_ptsz) variants are not modelled; as cuda.h allows ("If a per-thread version is not
// found, the API will return the legacy version"), the legacy one is returned. No cuInit needed.
EXPORT CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int version,
                                    unsigned long long flags, int* status) {
    ENTER_(cuGetProcAddress, false, false);
    if (status) *status = kProcSymbolNotFound;
    if (!symbol || !pfn || flags > 3) return kInvalidValue;
    *pfn = nullptr;
    if (version > S.driver_version) return kInvalidValue;
    const ProcEntry* best = nullptr;
    bool known = false;
    for (const ProcEntry& p : kProcs) {
        if (std::strcmp(p.name, symbol) != 0 || p.version > S.driver_version) continue;
        known = true;
        if (p.version <= version && (!best || p.version > best->version)) best = &p;
    }
    if (!best) {
        if (status) *status = known ? kProcVersionNotSufficient : kProcSymbolNotFound;
        return kNotFound;
    }
    *pfn = best->fn;
    if (status) *status = kProcSuccess;
    return kSuccess;
}

// ==== 18. Controls for tests =======================================================================
// A "kernel" of `usec` microseconds: enqueued like any work (blocks on a full queue, recorded if the
// stream is capturing, aborted by a sticky error). 0 names the current context's legacy stream.
EXPORT int emu_enqueue_sleep(void* h, long long usec) {
    if (S.forked.load() || !S.init.load()) return kNotInitialized;
    if (usec < 0) return kInvalidValue;
    return submit("emu_enqueue_sleep", h, kOpKernel, [&](const std::shared_ptr<Stream>&, Item& it, bool) {
        it.usec = usec;
        return kSuccess;
    });
}

// When stream `h` reaches this operation, its thread writes 1 to the eventfd `fd`: the device
// itself wakes a loop as its work ends, which no GPU can do. No driver call has this effect: it is
// the benchmark's sleeping-loop floor on the emulator, with the emulated device's threads running
// as they do for every way of waiting (a cpu-backend floor has none on its machine's cores).
EXPORT int emu_enqueue_notify(void* h, int fd) {
    if (S.forked.load() || !S.init.load()) return kNotInitialized;
    if (fd < 0) return kInvalidValue;
    return submit("emu_enqueue_notify", h, kOpNotify, [&](const std::shared_ptr<Stream>&, Item& it, bool) {
        it.fd = fd;
        return kSuccess;
    });
}

// The next event record or memory write on stream `h` finds it capturing: a relaxed-mode capture
// begins there first, as if another thread began it just after the caller checked (the race of a
// check before a mark). 0 disarms.
EXPORT void emu_capture_before_next_mark(void* h) {
    Lock g(S.mu);
    S.capture_before_mark = reinterpret_cast<uintptr_t>(h);
}

// The next event record or memory write on stream `h`, once enqueued, keeps its caller in the
// driver until emu_resume() (a slow call: the window between a mark and what its caller does
// next). emu_paused() says whether a caller waits there now. 0 disarms.
EXPORT void emu_pause_after_next_mark(void* h) {
    Lock g(S.mu);
    S.pause_after_mark = reinterpret_cast<uintptr_t>(h);
}
// The next capture query (cuStreamIsCapturing, cuStreamGetCaptureInfo) of stream `h`, by any
// thread, keeps its caller in the driver until emu_resume(), before it looks at the handle. 0
// disarms.
EXPORT void emu_pause_at_next_capture_check(void* h) {
    Lock g(S.mu);
    S.pause_capture_check = reinterpret_cast<uintptr_t>(h);
}
EXPORT int emu_paused() {
    Lock g(S.pause_mu);
    return S.paused ? 1 : 0;
}
EXPORT void emu_resume() {
    Lock g(S.pause_mu);
    if (S.paused) S.resume = true;
    S.pause_cv.notify_all();
}

// A sticky error `code` on `device`'s primary context, as after a faulting kernel.
EXPORT void emu_inject_error(int device, int code) {
    if (S.init.load() && device >= 0 && device < S.ndev && code) fault(S.primary[device], code);
}

static void wake_all_waiters() {  // after a tunable changed
    Lock g(S.mu);
    for (Ctx* c : S.ctxs) {
        c->cap_cv.notify_all();
        for (auto& s : c->streams) s->room_cv.notify_all();
    }
}
EXPORT void emu_set_hostfn_latency_us(long long usec) { S.latency_us = std::max(0LL, usec); }
EXPORT void emu_set_hostfn_cap(int cap) { S.hostfn_cap = std::max(1, cap), wake_all_waiters(); }
EXPORT void emu_set_queue_depth(int depth) { S.depth = std::max(1, depth), wake_all_waiters(); }
// The next `n` cuStreamCreate calls fail with CUDA_ERROR_OUT_OF_MEMORY (0: none).
EXPORT void emu_fail_stream_creates(int n) { S.failing_stream_creates = std::max(0, n); }

EXPORT void emu_defaults() {  // every control back to its default (env at load, else built in)
    S.latency_us = S.dflt_latency_us, S.hostfn_cap = S.dflt_cap, S.depth = S.dflt_depth;
    S.failing_stream_creates = 0;
    {
        Lock g(S.mu);
        S.capture_before_mark = 0, S.pause_after_mark = 0, S.pause_capture_check = 0;
    }
    emu_resume();
    wake_all_waiters();
}

EXPORT unsigned long long emu_thread_blocked_ns() { return t_blocked_ns; }

// Calls of entry point `name` by the calling thread; a version suffix (_v2) is ignored.
EXPORT unsigned long long emu_thread_calls(const char* name) {
    const char* v = std::strstr(name, "_v");
    size_t n = v && v[2] >= '0' && v[2] <= '9' ? static_cast<size_t>(v - name) : std::strlen(name);
    for (int i = 0; i < kNumEntries; ++i)
        if (std::strlen(kEntryNames[i]) == n && std::strncmp(kEntryNames[i], name, n) == 0) return t_calls[i];
    return 0;
}

// Operations of `kind` ever enqueued on a stream (0: the current context's legacy stream);
// "captured" counts those recorded into a capture instead of run.
EXPORT unsigned long long emu_stream_ops(void* h, const char* kind) {
    Lock g(S.mu);
    std::shared_ptr<Stream> s;
    if (get_stream("emu_stream_ops", h, s)) return 0;
    for (int k = 0; k < kNumOps; ++k)
        if (std::strcmp(kOpNames[k], kind) == 0) return s->ops[k].load();
    return 0;
}

// "streams", "events", "graphs": live handles; "hostfns_pending": host functions launched and not
// yet returned or dropped; "threads": live threads that called the driver, the emulator's own
// excluded; "emu_threads": the emulator's stream workers and callback threads. -1 if unknown.
EXPORT long long emu_live(const char* what) {
    Lock g(S.mu);
    std::string w = what;
    if (w == "streams") return static_cast<long long>(S.streams.size());
    if (w == "events") return static_cast<long long>(S.events.size());
    if (w == "graphs") return static_cast<long long>(S.graphs.size());
    if (w == "hostfns_pending") return S.hostfn_pending.load();
    if (w == "threads") return S.live_threads.load();
    if (w == "emu_threads") return S.emu_threads.load();
    return -1;
}

// CPU time the stream workers (the device) spent, live and exited ones: see DeviceClocks.
EXPORT unsigned long long emu_device_cpu_ns() {
    Lock g(dev_clocks.mu);
    unsigned long long sum = dev_clocks.exited_ns;
    for (clockid_t id : dev_clocks.live) sum += cpu_ns_of(id);
    return sum;
}

EXPORT unsigned long long emu_calls_from_host_fns() { return S.calls_from_host_fns.load(); }

EXPORT void emu_host_fn_stats(unsigned long long* calls, unsigned long long* total_ns,
                              unsigned long long* max_ns) {
    *calls = S.host_calls.load(), *total_ns = S.host_ns_total.load(), *max_ns = S.host_ns_max.load();
}

// A context of device 0 that is not a primary context (as cuCtxCreate would make), not made
// current. Never freed, like every context.
EXPORT void* emu_make_private_context() {
    if (!S.init.load()) return nullptr;
    Lock g(S.mu);
    Ctx* c = new Ctx;
    c->primary = false, c->active = true, c->id = S.next_ctx_id++;
    S.ctxs.insert(c);
    return c;
}

// The capture status of a stream (0 none, 1 active, 2 invalidated), without side effects.
EXPORT int emu_capture_status(void* h) {
    Lock g(S.mu);
    std::shared_ptr<Stream> s;
    return get_stream("emu_capture_status", h, s) || !s->cap ? kCapNone : s->cap->status;
}
