#include "cuda.hpp"
#include "spin.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>

namespace aiocuda::cuda {
namespace {

// The few driver prototypes aiocuda calls (cuda.h, CUDA 12/13), declared here so that no CUDA
// header is needed to build. Handles are opaque pointers; CUdevice is an int.
using Ctx = void*;
using Stream = void*;
using Event = void*;
using HostFn = void (*)(void*);
constexpr CUresult kSuccess = 0;
constexpr CUresult kNotReady = 600;
constexpr unsigned kEventDisableTiming = 0x2;
constexpr unsigned kStreamNonBlocking = 0x1;
constexpr CUresult kInvalidDevice = 101;
constexpr int kProcAddressVersion = 12000;  // the ABI of every entry point named below

struct Api {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDriverGetVersion)(int*);
    CUresult (*cuDeviceGetCount)(int*);
    CUresult (*cuDeviceGet)(int*, int);
    CUresult (*cuDeviceGetName)(char*, int, int);
    CUresult (*cuDevicePrimaryCtxRetain)(Ctx*, int);
    CUresult (*cuDevicePrimaryCtxGetState)(int, unsigned*, int*);
    CUresult (*cuCtxGetCurrent)(Ctx*);
    CUresult (*cuCtxSetCurrent)(Ctx);
    CUresult (*cuCtxPushCurrent)(Ctx);
    CUresult (*cuCtxPopCurrent)(Ctx*);
    CUresult (*cuStreamGetCtx)(Stream, Ctx*);
    CUresult (*cuStreamQuery)(Stream);
    CUresult (*cuStreamCreate)(Stream*, unsigned);
    CUresult (*cuStreamWaitEvent)(Stream, Event, unsigned);
    CUresult (*cuCtxSynchronize)();
    CUresult (*cuLaunchHostFunc)(Stream, HostFn, void*);
    CUresult (*cuEventCreate)(Event*, unsigned);
    CUresult (*cuEventRecord)(Event, Stream);
    CUresult (*cuEventQuery)(Event);
    CUresult (*cuEventSynchronize)(Event);
    CUresult (*cuEventDestroy)(Event);
    CUresult (*cuGetErrorName)(CUresult, const char**);
    CUresult (*cuGetErrorString)(CUresult, const char**);
};

// name for cuGetProcAddress, and the exported symbol for plain dlsym (cuda.h's #defines).
struct Entry { const char* name; const char* symbol; void** slot; };

Api api{};
DriverInfo info;
std::once_flag load_once;
bool forked = false;  // the driver was initialised in a parent process

bool resolve(void* lib, std::string* why) {
    Entry entries[] = {
        {"cuInit", "cuInit", (void**)&api.cuInit},
        {"cuDriverGetVersion", "cuDriverGetVersion", (void**)&api.cuDriverGetVersion},
        {"cuDeviceGetCount", "cuDeviceGetCount", (void**)&api.cuDeviceGetCount},
        {"cuDeviceGet", "cuDeviceGet", (void**)&api.cuDeviceGet},
        {"cuDeviceGetName", "cuDeviceGetName", (void**)&api.cuDeviceGetName},
        {"cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain", (void**)&api.cuDevicePrimaryCtxRetain},
        {"cuDevicePrimaryCtxGetState", "cuDevicePrimaryCtxGetState", (void**)&api.cuDevicePrimaryCtxGetState},
        {"cuCtxGetCurrent", "cuCtxGetCurrent", (void**)&api.cuCtxGetCurrent},
        {"cuCtxSetCurrent", "cuCtxSetCurrent", (void**)&api.cuCtxSetCurrent},
        {"cuCtxPushCurrent", "cuCtxPushCurrent_v2", (void**)&api.cuCtxPushCurrent},
        {"cuCtxPopCurrent", "cuCtxPopCurrent_v2", (void**)&api.cuCtxPopCurrent},
        {"cuStreamGetCtx", "cuStreamGetCtx", (void**)&api.cuStreamGetCtx},
        {"cuStreamQuery", "cuStreamQuery", (void**)&api.cuStreamQuery},
        {"cuStreamCreate", "cuStreamCreate", (void**)&api.cuStreamCreate},
        {"cuStreamWaitEvent", "cuStreamWaitEvent", (void**)&api.cuStreamWaitEvent},
        {"cuCtxSynchronize", "cuCtxSynchronize", (void**)&api.cuCtxSynchronize},
        {"cuLaunchHostFunc", "cuLaunchHostFunc", (void**)&api.cuLaunchHostFunc},
        {"cuEventCreate", "cuEventCreate", (void**)&api.cuEventCreate},
        {"cuEventRecord", "cuEventRecord", (void**)&api.cuEventRecord},
        {"cuEventQuery", "cuEventQuery", (void**)&api.cuEventQuery},
        {"cuEventSynchronize", "cuEventSynchronize", (void**)&api.cuEventSynchronize},
        {"cuEventDestroy", "cuEventDestroy_v2", (void**)&api.cuEventDestroy},
        {"cuGetErrorName", "cuGetErrorName", (void**)&api.cuGetErrorName},
        {"cuGetErrorString", "cuGetErrorString", (void**)&api.cuGetErrorString},
    };
    // CUDA >= 12: cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, symbolStatus).
    using GetProc = CUresult (*)(const char*, void**, int, unsigned long long, int*);
    auto get_proc = reinterpret_cast<GetProc>(dlsym(lib, "cuGetProcAddress_v2"));
    for (Entry& e : entries) {
        *e.slot = nullptr;
        if (get_proc) {
            int status = 0;
            if (get_proc(e.name, e.slot, kProcAddressVersion, 0, &status) != kSuccess)
                *e.slot = nullptr;
        }
        if (!*e.slot) *e.slot = dlsym(lib, e.symbol);
        if (!*e.slot) {
            *why = std::string("the CUDA driver has no ") + e.name +
                   ": it is too old for aiocuda (needs a CUDA 12 or newer driver)";
            return false;
        }
    }
    return true;
}

void do_load() {
    const char* env = std::getenv("AIOCUDA_LIBCUDA");
    info.path = (env && *env) ? env : "libcuda.so.1";
    void* lib = dlopen(info.path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char* e = dlerror();
        info.reason = "no CUDA driver: could not load " + info.path + " (" + (e ? e : "?") +
                      "); install the NVIDIA driver, or set AIOCUDA_LIBCUDA to libcuda's path";
        return;
    }
    if (!resolve(lib, &info.reason)) return;
    // dladdr gives the file actually loaded, which is what `info` should show.
    Dl_info dl{};
    if (dladdr(reinterpret_cast<void*>(api.cuInit), &dl) && dl.dli_fname) info.path = dl.dli_fname;
    api.cuDriverGetVersion(&info.version);
    if (CUresult r = api.cuInit(0); r != kSuccess) {
        info.reason = "the CUDA driver failed to initialise: " + error_text(r);
        return;
    }
    api.cuDeviceGetCount(&info.device_count);
    if (info.device_count == 0) {
        info.reason = "the CUDA driver found no device";
        return;
    }
    info.available = true;
}

// ---- records waiting on a host function ------------------------------------------------------
// The host function receives a key (generation << 32 | slot), never a pointer, so a record that
// the backstop already failed and freed can never be touched by a late host function.
// `own`: an aiocuda stream lent to this wait (event waits), returned to the pool when it ends.
struct Slot { Node* node; Ctx ctx; uint32_t gen; Stream own; };

// Waits for all the work queued on one device (cuCtxSynchronize on a native thread), for
// frameworks that expose no stream: every request that arrives while a synchronize runs is
// served by the next one, so one thread serves any number of waiters.
struct DeviceWaiter {
    Ctx ctx;
    std::mutex mu;
    std::condition_variable cv;
    std::vector<Node*> waiting;
};

// Heap-allocated and never destroyed: the backstop thread waits on `cv` until the process ends,
// and destroying a condition variable with a waiter blocks forever at exit.
// The loop thread adds and the driver thread takes, each for a few instructions: a spin lock
// costs less than a mutex's futex traffic when the two meet.
class SpinLock {
public:
    void lock() noexcept {
        for (int i = 0; flag_.exchange(true, std::memory_order_acquire); ++i) {
            while (flag_.load(std::memory_order_relaxed)) {
                if (++i > 64) std::this_thread::yield();  // the holder was preempted
                else cpu_relax();
            }
        }
    }
    void unlock() noexcept { flag_.store(false, std::memory_order_release); }

private:
    std::atomic<bool> flag_{false};
};

struct CtxCount { Ctx ctx; size_t count; };

struct Table {
    SpinLock mu;
    std::condition_variable_any cv;  // the idle backstop waits here
    bool backstop_waiting = false;
    bool backstop_started = false;
    std::vector<Slot> slots;
    std::vector<uint32_t> free_slots;
    std::vector<CtxCount> pending_per_ctx;  // a few contexts at most: a vector beats a map
    size_t pending_total = 0;
    std::mutex ctx_mu;
    std::vector<Ctx> primaries;  // primary contexts seen so far (retained, never released)
    std::vector<Ctx> primary_by_device;  // retained once by primary_ctx()
    std::vector<DeviceWaiter*> device_waiters;  // by device, created on first use, leaked
    std::vector<std::pair<Ctx, Stream>> stream_pool;  // idle streams for event waits (under mu)
    size_t pooled_streams = 0;  // ever created; stream_pool's capacity, so a host function's
                                // return of a stream never allocates
    std::atomic<Ctx> last_primary{nullptr};  // lock-free answer for the common case
};
Table* table = new Table;
std::atomic<int> backstop_period_ms{20};

void backstop();

uint64_t table_add(Node* n, Ctx ctx, Stream own = nullptr) {
    std::lock_guard<SpinLock> g(table->mu);
    uint32_t idx;
    if (!table->free_slots.empty()) {
        idx = table->free_slots.back();
        table->free_slots.pop_back();
    } else {
        idx = static_cast<uint32_t>(table->slots.size());
        table->slots.push_back(Slot{nullptr, nullptr, 1, nullptr});
    }
    Slot& s = table->slots[idx];
    s.node = n;
    s.ctx = ctx;
    s.own = own;
    ++table->pending_total;
    auto& counts = table->pending_per_ctx;
    auto it = std::find_if(counts.begin(), counts.end(), [&](auto& c) { return c.ctx == ctx; });
    if (it == counts.end()) counts.push_back(CtxCount{ctx, 1}); else ++it->count;
    if (table->backstop_waiting) {  // it sleeps only while nothing is pending
        table->backstop_waiting = false;
        table->cv.notify_one();
    }
    if (!table->backstop_started) {
        table->backstop_started = true;
        std::thread(backstop).detach();
    }
    return (static_cast<uint64_t>(s.gen) << 32) | idx;
}

Node* take_locked(uint32_t idx) {
    Slot& s = table->slots[idx];
    Node* n = s.node;
    auto& counts = table->pending_per_ctx;
    auto it = std::find_if(counts.begin(), counts.end(), [&](auto& c) { return c.ctx == s.ctx; });
    if (--it->count == 0) {
        *it = counts.back();
        counts.pop_back();
    }
    --table->pending_total;
    if (s.own) table->stream_pool.emplace_back(s.ctx, s.own);  // no CUDA call: just bookkeeping
    s.node = nullptr;
    s.own = nullptr;
    if (++s.gen == 0) s.gen = 1;
    table->free_slots.push_back(idx);
    return n;
}

Node* table_take(uint64_t key) {
    uint32_t idx = static_cast<uint32_t>(key);
    uint32_t gen = static_cast<uint32_t>(key >> 32);
    std::lock_guard<SpinLock> g(table->mu);
    if (idx >= table->slots.size() || table->slots[idx].gen != gen || !table->slots[idx].node) return nullptr;
    return take_locked(idx);
}

// Runs on the driver's thread: native memory only, no GIL, no CUDA call.
void host_fn(void* user_data) {
    if (Node* n = table_take(reinterpret_cast<uintptr_t>(user_data))) complete(n, kSuccess);
}

void fail_ctx(Ctx ctx, CUresult code) {
    std::vector<Node*> failed;
    {
        std::lock_guard<SpinLock> g(table->mu);
        for (uint32_t i = 0; i < table->slots.size(); ++i)
            if (table->slots[i].node && table->slots[i].ctx == ctx) failed.push_back(take_locked(i));
    }
    for (Node* n : failed) complete(n, code);
}

// cuLaunchHostFunc never calls its function after a context error, so without this a sticky
// error would leave every pending await hanging. While records are pending it asks each of their
// contexts, every period, whether the context is still healthy; idle, it sleeps on a condvar.
void backstop() {
    std::vector<Ctx> ctxs;
    for (;;) {
        {
            std::unique_lock<SpinLock> g(table->mu);
            while (table->pending_per_ctx.empty()) {
                table->backstop_waiting = true;
                table->cv.wait(g);
            }
            table->backstop_waiting = false;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(backstop_period_ms.load()));
        ctxs.clear();
        {
            std::lock_guard<SpinLock> g(table->mu);
            for (auto& c : table->pending_per_ctx) ctxs.push_back(c.ctx);
        }
        for (Ctx c : ctxs) {
            // The legacy stream of the context reports the context's sticky error, if any.
            if (api.cuCtxSetCurrent(c) != kSuccess) continue;
            CUresult r = api.cuStreamQuery(nullptr);
            if (r != kSuccess && r != kNotReady) fail_ctx(c, r);
        }
    }
}

// ---- contexts ----------------------------------------------------------------------------------

bool is_primary(Ctx ctx) {
    if (ctx && table->last_primary.load(std::memory_order_acquire) == ctx) return true;
    std::lock_guard<std::mutex> g(table->ctx_mu);
    if (std::find(table->primaries.begin(), table->primaries.end(), ctx) !=
        table->primaries.end()) {
        table->last_primary.store(ctx, std::memory_order_release);
        return true;
    }
    for (int dev = 0; dev < info.device_count; ++dev) {
        unsigned flags = 0;
        int active = 0;
        // Only look at primary contexts that exist: retaining an inactive one would create it.
        if (api.cuDevicePrimaryCtxGetState(dev, &flags, &active) != kSuccess || !active) continue;
        Ctx p = nullptr;
        if (api.cuDevicePrimaryCtxRetain(&p, dev) != kSuccess) continue;
        if (std::find(table->primaries.begin(), table->primaries.end(), p) == table->primaries.end())
            table->primaries.push_back(p);
        if (p == ctx) {
            table->last_primary.store(ctx, std::memory_order_release);
            return true;
        }
    }
    return false;
}

CUresult check_ready(std::string* why) {
    const DriverInfo& d = load();
    if (!d.available) {
        *why = d.reason;
        return kNotLoaded;
    }
    if (forked) {
        *why = "CUDA was initialised in the parent process before fork(), and the driver cannot be "
               "used in a forked child: start worker processes with multiprocessing's 'spawn' "
               "method";
        return kForked;
    }
    return kSuccess;
}

// The context `stream` belongs to. Handles 0, 1 (CU_STREAM_LEGACY) and 2 (CU_STREAM_PER_THREAD)
// mean the current context; with none current, device 0's primary context becomes current, as
// the CUDA runtime does.
CUresult stream_ctx(uintptr_t stream, Ctx* ctx, std::string* why) {
    CUresult r;
    if (stream <= 2) {
        if ((r = api.cuCtxGetCurrent(ctx)) != kSuccess) return r;
        if (!*ctx) {
            int dev = 0;
            if ((r = api.cuDeviceGet(&dev, 0)) != kSuccess) return r;
            if ((r = api.cuDevicePrimaryCtxRetain(ctx, dev)) != kSuccess) return r;
            if ((r = api.cuCtxSetCurrent(*ctx)) != kSuccess) return r;
        }
    } else if ((r = api.cuStreamGetCtx(reinterpret_cast<Stream>(stream), ctx)) != kSuccess) {
        return r;
    }
    if (!is_primary(*ctx)) {
        *why = "the stream belongs to a CUDA context that is not a device's primary context; "
               "aiocuda supports primary contexts only (the ones PyTorch and TensorFlow use)";
        return kNotPrimary;
    }
    return kSuccess;
}

void discard(Node* n) {
    Queue* q = n->queue;
    free_node(n);
    q->release();
}

CUresult check_device(int device, std::string* why) {
    if (device >= 0 && device < info.device_count) return kSuccess;
    *why = "no CUDA device " + std::to_string(device) + ": this machine has " +
           std::to_string(info.device_count) + " (valid ordinals are 0 to " +
           std::to_string(info.device_count - 1) + ")";
    return kInvalidDevice;
}

// Device `device`'s primary context, retained once per process.
CUresult primary_ctx(int device, Ctx* ctx) {
    std::lock_guard<std::mutex> g(table->ctx_mu);
    auto& by_dev = table->primary_by_device;
    if (by_dev.size() <= static_cast<size_t>(device)) by_dev.resize(device + 1, nullptr);
    if (!by_dev[device]) {
        int dev = 0;
        CUresult r = api.cuDeviceGet(&dev, device);
        if (r == kSuccess) r = api.cuDevicePrimaryCtxRetain(&by_dev[device], dev);
        if (r != kSuccess) return r;
    }
    *ctx = by_dev[device];
    return kSuccess;
}

// Runs `fn` with `ctx` current on this thread, restoring the previous context after.
template <class F>
CUresult with_ctx(Ctx ctx, F fn) {
    Ctx cur = nullptr;
    CUresult r = api.cuCtxGetCurrent(&cur);
    if (r != kSuccess) return r;
    bool push = cur != ctx;
    if (push && (r = api.cuCtxPushCurrent(ctx)) != kSuccess) return r;
    r = fn();
    if (push) {
        Ctx popped;
        api.cuCtxPopCurrent(&popped);
    }
    return r;
}

void device_waiter_run(DeviceWaiter* w) {
    std::vector<Node*> taken;
    api.cuCtxSetCurrent(w->ctx);
    for (;;) {
        {
            std::unique_lock<std::mutex> g(w->mu);
            w->cv.wait(g, [&] { return !w->waiting.empty(); });
            taken.swap(w->waiting);
        }
        CUresult r = api.cuCtxSynchronize();  // covers all work queued before these requests
        for (Node* n : taken) complete(n, r);
        taken.clear();
    }
}

}  // namespace

const DriverInfo& load() {
    std::call_once(load_once, do_load);
    return info;
}

std::string error_text(CUresult code) {
    const char* name = nullptr;
    const char* text = nullptr;
    if (api.cuGetErrorName) api.cuGetErrorName(code, &name);
    if (api.cuGetErrorString) api.cuGetErrorString(code, &text);
    std::string s = name ? name : "CUDA_ERROR_" + std::to_string(code);
    if (text) s += std::string(": ") + text;
    return s;
}

std::string device_name(int ordinal) {
    char buf[256] = {0};
    int dev = 0;
    if (!load().available || api.cuDeviceGet(&dev, ordinal) != kSuccess ||
        api.cuDeviceGetName(buf, sizeof buf - 1, dev) != kSuccess)
        return "";
    return buf;
}

CUresult submit(uintptr_t stream, Node* n, std::string* why) {
    Ctx ctx = nullptr;
    CUresult r = check_ready(why);
    if (r == kSuccess) r = stream_ctx(stream, &ctx, why);
    if (r != kSuccess) {
        discard(n);
        return r;
    }
    uint64_t key = table_add(n, ctx);
    r = api.cuLaunchHostFunc(reinterpret_cast<Stream>(stream), host_fn,
                             reinterpret_cast<void*>(key));
    if (r != kSuccess) {
        // Not enqueued. If the backstop got to it first it is already on its way to the loop,
        // which drops tokens nobody waits for.
        if (Node* back = table_take(key)) discard(back);
    }
    return r;
}

CUresult event_record(uintptr_t stream, uintptr_t* ev, std::string* why) {
    Ctx ctx = nullptr;
    CUresult r = check_ready(why);
    if (r == kSuccess) r = stream_ctx(stream, &ctx, why);
    if (r != kSuccess) return r;
    Event e = nullptr;
    r = with_ctx(ctx, [&] {  // cuEventCreate uses the current context: make it the stream's
        CUresult c = api.cuEventCreate(&e, kEventDisableTiming);
        if (c == kSuccess && (c = api.cuEventRecord(e, reinterpret_cast<Stream>(stream))) != kSuccess) {
            api.cuEventDestroy(e);
            e = nullptr;
        }
        return c;
    });
    *ev = reinterpret_cast<uintptr_t>(e);
    return r;
}

CUresult wait_event(uintptr_t ev, int device, Node* n, std::string* why) {
    Ctx ctx = nullptr;
    CUresult r = check_ready(why);
    if (r == kSuccess) r = check_device(device, why);
    if (r == kSuccess) r = primary_ctx(device, &ctx);
    if (r == kSuccess) {
        r = with_ctx(ctx, [&] {
            // A stream of our own per wait (from a pool), so that a wait on a late event never
            // holds up a wait on an early one.
            Stream s = nullptr;
            {
                std::lock_guard<SpinLock> g(table->mu);
                auto& pool = table->stream_pool;
                auto it = std::find_if(pool.begin(), pool.end(), [&](auto& p) { return p.first == ctx; });
                if (it != pool.end()) {
                    s = it->second;
                    *it = pool.back();
                    pool.pop_back();
                }
            }
            if (!s) {
                CUresult c = api.cuStreamCreate(&s, kStreamNonBlocking);
                if (c != kSuccess) return c;
                std::lock_guard<SpinLock> g(table->mu);  // room for every stream to come back
                table->stream_pool.reserve(++table->pooled_streams);
            }
            CUresult e;
            if ((e = api.cuStreamWaitEvent(s, reinterpret_cast<Event>(ev), 0)) != kSuccess) {
                std::lock_guard<SpinLock> g(table->mu);
                table->stream_pool.emplace_back(ctx, s);
                return e;
            }
            uint64_t key = table_add(n, ctx, s);
            e = api.cuLaunchHostFunc(s, host_fn, reinterpret_cast<void*>(key));
            if (e != kSuccess) {
                if (Node* back = table_take(key)) discard(back);  // returns `s` to the pool
            }
            n = nullptr;  // the table (or the backstop) owns it now
            return e;
        });
    }
    if (n) discard(n);
    return r;
}

CUresult device_synchronize(int device, Node* n, std::string* why) {
    Ctx ctx = nullptr;
    CUresult r = check_ready(why);
    if (r == kSuccess) r = check_device(device, why);
    if (r == kSuccess) r = primary_ctx(device, &ctx);
    if (r != kSuccess) {
        discard(n);
        return r;
    }
    DeviceWaiter* w;
    {
        std::lock_guard<std::mutex> g(table->ctx_mu);
        auto& ws = table->device_waiters;
        if (ws.size() <= static_cast<size_t>(device)) ws.resize(device + 1, nullptr);
        if (!ws[device]) {
            ws[device] = new DeviceWaiter;
            ws[device]->ctx = ctx;
            std::thread(device_waiter_run, ws[device]).detach();
        }
        w = ws[device];
    }
    {
        std::lock_guard<std::mutex> g(w->mu);
        w->waiting.push_back(n);
    }
    w->cv.notify_one();
    return kSuccess;
}

CUresult event_query(uintptr_t ev) { return api.cuEventQuery(reinterpret_cast<Event>(ev)); }

CUresult event_synchronize(uintptr_t ev) {
    return api.cuEventSynchronize(reinterpret_cast<Event>(ev));
}

void event_destroy(uintptr_t ev) {
    if (!forked && ev) api.cuEventDestroy(reinterpret_cast<Event>(ev));
}

size_t pending() {
    std::lock_guard<SpinLock> g(table->mu);
    return table->pending_total;
}

void set_backstop_period_ms(int ms) { backstop_period_ms = std::max(1, ms); }

void after_fork_in_child() {
    // Only this thread exists now: the parent's locks may be held forever and its pending
    // records belong to its queues. Start from a fresh table and leak the old one.
    table = new Table;
    if (info.available) forked = true;
}

}  // namespace aiocuda::cuda
