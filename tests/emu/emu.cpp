// A CUDA driver emulator for aiocuda's tests: the subset of the driver API that aiocuda calls,
// with streams as native FIFO worker threads, plus controls (emu_*) to add timed work and inject
// a sticky context error. Test-only: built by tests/conftest.py, never installed. It stands in
// for hardware that CI does not have; it does not replace a run on a real GPU.
//
// Semantics follow the CUDA driver API reference: host functions run in stream order on a
// driver thread and are never called after a context error (cuLaunchHostFunc); every call
// returns the sticky error once one has happened; cuStreamQuery reports NOT_READY while work
// is queued.
#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "spin.hpp"  // csrc/: header-only, nothing of the package is linked in

using aiocuda::cpu_relax;

extern "C" {
typedef int CUresult;
typedef void (*CUhostFn)(void*);
}

namespace {

constexpr CUresult kSuccess = 0, kInvalidValue = 1, kNotInitialized = 3, kNoDevice = 100,
                   kInvalidDevice = 101, kInvalidContext = 201, kInvalidHandle = 400,
                   kNotFound = 500, kNotReady = 600;

struct Event {
    std::atomic<uint64_t> recorded{0};
    std::atomic<uint64_t> completed{0};
    std::atomic<int64_t> at_ns{0};  // steady clock when last reached, for cuEventElapsedTime
};

struct Ctx;

struct Item {
    enum Kind { Host, Sleep, Record, Wait } kind;
    CUhostFn fn = nullptr;
    void* ud = nullptr;
    int64_t usec = 0;
    Event* ev = nullptr;
    uint64_t gen = 0;
};

struct Stream {
    Ctx* ctx;
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Item> items;
    bool busy = false;
    bool waiting = false;
    std::atomic<uint64_t> pushed{0};
    bool destroyed = false;
    explicit Stream(Ctx* c);
    void push(Item it) {
        bool wake;
        {
            std::lock_guard<std::mutex> g(mu);
            items.push_back(it);
            pushed.fetch_add(1, std::memory_order_release);
            wake = waiting;
        }
        if (wake) cv.notify_one();
    }
    void run();
};

struct Ctx {
    int dev;
    bool primary;
    Stream* legacy = nullptr;
};

std::mutex g_mu;
std::atomic<int> g_sticky{0};
std::mutex* g_sleep_mu = new std::mutex;  // leaked: sleepers may outlive static destructors
std::condition_variable* g_sleep_cv = new std::condition_variable;
std::atomic<bool> g_init{false};
std::vector<Ctx*> g_primary;  // by device, created on retain
std::set<Stream*> g_streams;
std::set<Ctx*> g_ctxs;
thread_local std::vector<Ctx*> t_ctx_stack;  // back() is current
std::atomic<long long> g_launch_delay_us{0};
thread_local bool t_in_host_fn = false;
std::atomic<uint64_t> g_calls_from_host_fn{0};  // CUDA forbids driver calls in host functions
std::atomic<uint64_t> g_host_calls{0}, g_host_ns_total{0}, g_host_ns_max{0};

int device_count() {
    const char* e = std::getenv("AIOCUDA_EMU_DEVICES");
    return e ? std::atoi(e) : 1;
}

Ctx* current() { return t_ctx_stack.empty() ? nullptr : t_ctx_stack.back(); }

Stream::Stream(Ctx* c) : ctx(c) {
    std::thread([this] { run(); }).detach();
}

void Stream::run() {
    uint64_t taken = 0;
    for (;;) {
        Item it;
        // Like a GPU front end polling its push buffer, spin briefly before sleeping, so that a
        // burst of launches does not pay a futex wake each.
        for (int i = 0; i < 4096 && pushed.load(std::memory_order_acquire) == taken; ++i)
            cpu_relax();
        {
            std::unique_lock<std::mutex> g(mu);
            if (items.empty() && !destroyed) {
                waiting = true;
                cv.wait(g, [&] { return !items.empty() || destroyed; });
                waiting = false;
            }
            if (items.empty()) return;  // destroyed and drained (the Stream is leaked)
            ++taken;
            it = items.front();
            items.pop_front();
            busy = true;
        }
        if (g_sticky.load() == 0) {
            switch (it.kind) {
                case Item::Host: {
                    auto t0 = std::chrono::steady_clock::now();
                    t_in_host_fn = true;
                    it.fn(it.ud);
                    t_in_host_fn = false;
                    uint64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                      std::chrono::steady_clock::now() - t0).count();
                    g_host_calls.fetch_add(1);
                    g_host_ns_total.fetch_add(ns);
                    uint64_t m = g_host_ns_max.load();
                    while (ns > m && !g_host_ns_max.compare_exchange_weak(m, ns)) {}
                    break;
                }
                case Item::Sleep: {
                    // An injected error aborts the work, as a fault would.
                    auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(it.usec);
                    std::unique_lock<std::mutex> g(*g_sleep_mu);
                    g_sleep_cv->wait_until(g, end, [] { return g_sticky.load() != 0; });
                    break;
                }
                case Item::Record: {
                    it.ev->at_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now().time_since_epoch()).count());
                    uint64_t c = it.ev->completed.load();
                    while (it.gen > c && !it.ev->completed.compare_exchange_weak(c, it.gen)) {}
                    break;
                }
                case Item::Wait:
                    while (g_sticky.load() == 0 && it.ev->completed.load() < it.gen)
                        std::this_thread::sleep_for(std::chrono::microseconds(50));
                    break;
            }
        }  // after a context error, queued work is dropped: host functions are never called
        {
            std::lock_guard<std::mutex> g(mu);
            busy = false;
        }
    }
}

CUresult resolve_stream(void* h, Stream** out) {
    uintptr_t v = reinterpret_cast<uintptr_t>(h);
    if (v <= 2) {  // 0, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD: the current context's stream
        Ctx* c = current();
        if (!c) return kInvalidContext;
        std::lock_guard<std::mutex> g(g_mu);
        if (!c->legacy) c->legacy = new Stream(c);
        *out = c->legacy;
        return kSuccess;
    }
    std::lock_guard<std::mutex> g(g_mu);
    Stream* s = static_cast<Stream*>(h);
    if (!g_streams.count(s)) return kInvalidHandle;
    *out = s;
    return kSuccess;
}

#define CHECK_STICKY()                              \
    do {                                            \
        if (t_in_host_fn) g_calls_from_host_fn++;   \
        if (int e_ = g_sticky.load()) return e_;    \
        if (!g_init.load()) return kNotInitialized; \
    } while (0)

}  // namespace

extern "C" {

__attribute__((visibility("default"))) CUresult cuInit(unsigned flags) {
    if (flags != 0) return kInvalidValue;
    if (const char* e = std::getenv("AIOCUDA_EMU_INIT_ERROR")) return std::atoi(e);
    g_init = true;
    std::lock_guard<std::mutex> g(g_mu);
    if (g_primary.empty()) g_primary.assign(device_count(), nullptr);
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuDeviceGetCount(int* n) {
    if (!g_init) return kNotInitialized;
    *n = device_count();
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuDeviceGet(int* dev, int ordinal) {
    if (!g_init) return kNotInitialized;
    if (ordinal < 0 || ordinal >= device_count()) return kInvalidDevice;
    *dev = ordinal;
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuDeviceGetName(char* name, int len, int dev) {
    if (dev < 0 || dev >= device_count()) return kInvalidDevice;
    std::snprintf(name, len, "aiocuda driver emulator %d", dev);
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    CHECK_STICKY();
    if (dev < 0 || dev >= device_count()) return kInvalidDevice;
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_primary[dev]) {
        g_primary[dev] = new Ctx{dev, true};
        g_ctxs.insert(g_primary[dev]);
    }
    *ctx = g_primary[dev];
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuDevicePrimaryCtxGetState(int dev, unsigned* flags,
                                                                           int* active) {
    if (t_in_host_fn) g_calls_from_host_fn++;
    if (dev < 0 || dev >= device_count()) return kInvalidDevice;
    std::lock_guard<std::mutex> g(g_mu);
    *flags = 0;
    *active = g_primary[dev] != nullptr;
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuCtxGetCurrent(void** ctx) {
    if (t_in_host_fn) g_calls_from_host_fn++;
    if (!g_init) return kNotInitialized;
    *ctx = current();
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuCtxSetCurrent(void* ctx) {
    if (t_in_host_fn) g_calls_from_host_fn++;
    if (!g_init) return kNotInitialized;
    if (t_ctx_stack.empty()) t_ctx_stack.push_back(nullptr);
    t_ctx_stack.back() = static_cast<Ctx*>(ctx);
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuCtxPushCurrent_v2(void* ctx) {
    if (t_in_host_fn) g_calls_from_host_fn++;
    t_ctx_stack.push_back(static_cast<Ctx*>(ctx));
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuCtxPopCurrent_v2(void** ctx) {
    if (t_in_host_fn) g_calls_from_host_fn++;
    if (t_ctx_stack.empty()) return kInvalidContext;
    if (ctx) *ctx = t_ctx_stack.back();
    t_ctx_stack.pop_back();
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuStreamCreate(void** out, unsigned) {
    CHECK_STICKY();
    Ctx* c = current();
    if (!c) return kInvalidContext;
    Stream* s = new Stream(c);
    std::lock_guard<std::mutex> g(g_mu);
    g_streams.insert(s);
    *out = s;
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuStreamDestroy_v2(void* h) {
    std::lock_guard<std::mutex> g(g_mu);
    Stream* s = static_cast<Stream*>(h);
    if (!g_streams.erase(s)) return kInvalidHandle;
    {
        std::lock_guard<std::mutex> g2(s->mu);
        s->destroyed = true;  // queued work still runs, then the worker exits
    }
    s->cv.notify_one();
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuStreamGetCtx(void* h, void** ctx) {
    CHECK_STICKY();
    Stream* s;
    if (CUresult r = resolve_stream(h, &s)) return r;
    *ctx = s->ctx;
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuStreamQuery(void* h) {
    CHECK_STICKY();
    Stream* s;
    if (CUresult r = resolve_stream(h, &s)) return r;
    std::lock_guard<std::mutex> g(s->mu);
    return (s->busy || !s->items.empty()) ? kNotReady : kSuccess;
}

__attribute__((visibility("default"))) CUresult cuLaunchHostFunc(void* h, CUhostFn fn, void* ud) {
    CHECK_STICKY();
    if (!fn) return kInvalidValue;
    if (long long d = g_launch_delay_us.load())  // as when the driver waits on a running host fn
        std::this_thread::sleep_for(std::chrono::microseconds(d));
    Stream* s;
    if (CUresult r = resolve_stream(h, &s)) return r;
    Item it{Item::Host};
    it.fn = fn;
    it.ud = ud;
    s->push(it);
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuEventCreate(void** ev, unsigned) {
    CHECK_STICKY();
    if (!current()) return kInvalidContext;
    *ev = new Event();
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuEventRecord(void* ev, void* h) {
    CHECK_STICKY();
    Stream* s;
    if (CUresult r = resolve_stream(h, &s)) return r;
    Event* e = static_cast<Event*>(ev);
    Item it{Item::Record};
    it.ev = e;
    it.gen = ++e->recorded;
    s->push(it);
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuEventQuery(void* ev) {
    CHECK_STICKY();
    Event* e = static_cast<Event*>(ev);
    return e->completed.load() >= e->recorded.load() ? kSuccess : kNotReady;
}

// Returns once every stream of the current context is idle (or on a sticky error).
__attribute__((visibility("default"))) CUresult cuCtxSynchronize() {
    CHECK_STICKY();
    Ctx* c = current();
    if (!c) return kInvalidContext;
    for (;;) {
        if (int e = g_sticky.load()) return e;
        bool idle = true;
        {
            std::lock_guard<std::mutex> g(g_mu);
            std::vector<Stream*> mine;
            for (Stream* s : g_streams)
                if (s->ctx == c) mine.push_back(s);
            if (c->legacy) mine.push_back(c->legacy);
            for (Stream* s : mine) {
                std::lock_guard<std::mutex> gs(s->mu);
                if (!s->items.empty() || s->busy) idle = false;
            }
        }
        if (idle) return kSuccess;
        std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
}

__attribute__((visibility("default"))) CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    CHECK_STICKY();
    Event* e0 = static_cast<Event*>(a);
    Event* e1 = static_cast<Event*>(b);
    if (!ms || !e0 || !e1) return kInvalidValue;
    if (e0->completed.load() < e0->recorded.load() || e1->completed.load() < e1->recorded.load())
        return kNotReady;
    *ms = static_cast<float>((e1->at_ns.load() - e0->at_ns.load()) / 1e6);
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuEventSynchronize(void* ev) {
    if (t_in_host_fn) g_calls_from_host_fn++;
    Event* e = static_cast<Event*>(ev);
    uint64_t want = e->recorded.load();
    for (;;) {
        if (int err = g_sticky.load()) return err;
        if (e->completed.load() >= want) return kSuccess;
        std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
}

__attribute__((visibility("default"))) CUresult cuEventDestroy_v2(void*) {
    return kSuccess;  // events are leaked: a pending record may still reference one
}

__attribute__((visibility("default"))) CUresult cuStreamWaitEvent(void* h, void* ev, unsigned) {
    CHECK_STICKY();
    Stream* s;
    if (CUresult r = resolve_stream(h, &s)) return r;
    Item it{Item::Wait};
    it.ev = static_cast<Event*>(ev);
    it.gen = it.ev->recorded.load();
    s->push(it);
    return kSuccess;
}

__attribute__((visibility("default"))) CUresult cuGetErrorName(CUresult code, const char** s) {
    switch (code) {
        case 0: *s = "CUDA_SUCCESS"; return kSuccess;
        case 1: *s = "CUDA_ERROR_INVALID_VALUE"; return kSuccess;
        case 3: *s = "CUDA_ERROR_NOT_INITIALIZED"; return kSuccess;
        case 100: *s = "CUDA_ERROR_NO_DEVICE"; return kSuccess;
        case 201: *s = "CUDA_ERROR_INVALID_CONTEXT"; return kSuccess;
        case 400: *s = "CUDA_ERROR_INVALID_HANDLE"; return kSuccess;
        case 600: *s = "CUDA_ERROR_NOT_READY"; return kSuccess;
        case 700: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; return kSuccess;
        case 719: *s = "CUDA_ERROR_LAUNCH_FAILED"; return kSuccess;
        default: *s = nullptr; return kInvalidValue;
    }
}

__attribute__((visibility("default"))) CUresult cuGetErrorString(CUresult code, const char** s) {
    switch (code) {
        case 1: *s = "invalid argument"; return kSuccess;
        case 100: *s = "no CUDA-capable device is detected"; return kSuccess;
        case 201: *s = "invalid device context"; return kSuccess;
        case 400: *s = "invalid resource handle"; return kSuccess;
        case 700: *s = "an illegal memory access was encountered"; return kSuccess;
        case 719: *s = "unspecified launch failure"; return kSuccess;
        default: *s = nullptr; return kInvalidValue;
    }
}

// cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, symbolStatus): the versioned names are
// resolved as the real driver does for cudaVersion 12000.
__attribute__((visibility("default"))) CUresult cuGetProcAddress_v2(const char* sym, void** pfn,
                                                                     int, unsigned long long,
                                                                     int* status) {
    static const char* versioned[] = {"cuCtxPushCurrent", "cuCtxPopCurrent", "cuStreamDestroy",
                                      "cuEventDestroy"};
    std::string name = sym;
    for (const char* v : versioned)
        if (name == v) name += "_v2";
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&cuInit), &info);
    void* self = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    *pfn = self ? dlsym(self, name.c_str()) : nullptr;
    if (self) dlclose(self);
    if (status) *status = *pfn ? 0 : 1;
    return *pfn ? kSuccess : kNotFound;
}

// ---- controls -----------------------------------------------------------------------------
__attribute__((visibility("default"))) int emu_enqueue_sleep(void* h, long long usec) {
    Stream* s;
    if (CUresult r = resolve_stream(h, &s)) return r;
    Item it{Item::Sleep};
    it.usec = usec;
    s->push(it);
    return kSuccess;
}

// A sticky context error, as after a faulting kernel: queued work is dropped, host functions
// are never called, every later call returns `code`.
__attribute__((visibility("default"))) void emu_inject_error(int code) {
    {
        std::lock_guard<std::mutex> g(*g_sleep_mu);
        g_sticky = code;
    }
    g_sleep_cv->notify_all();
}

// Makes every cuLaunchHostFunc block for `usec` first.
__attribute__((visibility("default"))) void emu_set_launch_delay_us(long long usec) {
    g_launch_delay_us = usec;
}

// Clears the sticky error (cuDevicePrimaryCtxReset's effect), for test isolation.
__attribute__((visibility("default"))) void emu_reset() { g_sticky = 0; }

// A context that is not a primary context (as cuCtxCreate would make), made current.
__attribute__((visibility("default"))) void* emu_make_private_context() {
    Ctx* c = new Ctx{0, false};
    std::lock_guard<std::mutex> g(g_mu);
    g_ctxs.insert(c);
    return c;
}

__attribute__((visibility("default"))) unsigned long long emu_calls_from_host_fns() {
    return g_calls_from_host_fn.load();
}

__attribute__((visibility("default"))) void emu_host_fn_stats(unsigned long long* calls,
                                                             unsigned long long* total_ns,
                                                             unsigned long long* max_ns) {
    *calls = g_host_calls.load();
    *total_ns = g_host_ns_total.load();
    *max_ns = g_host_ns_max.load();
}

}  // extern "C"
