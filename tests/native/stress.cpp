// A native stress harness for aiocuda's core, built by scripts/tsan-test with -fsanitize=thread
// (it runs under any build: each part checks its own results and exits non-zero on a failure).
// No Python: it drives csrc/ directly, standing in for the event loops (one Queue per "loop").
//
//   queue  producers completing records into one Queue while its consumer polls the eventfd and
//          drains in small batches (every record once, per-producer order, no lost wake-up); then
//          the consumer closing the queue while records are still being completed
//   cpu    CpuStreams with markers, event records, cross-stream event waits and delays, closed
//          (from another thread too) and destroyed while busy; checks every accepted marker
//          completed once, in stream order, after the records and waits submitted before it
//   cuda   the completion engine on the driver emulator (AIOCUDA_LIBCUDA): several loop threads,
//          each with its own Queue, waiting on their own and on a shared stream (wait_stream,
//          record + mark_query/mark_synchronize, wait_device, foreign events), under the callback
//          and the poll strategy and while another thread switches between them; then a sticky
//          error injected and a primary-context reset, each while waits are pending, and recovery
//
// Never submits a cpu Call item (the one path that needs the Python C API: cpu.cpp is linked
// against libpython, which is never initialised).
//
// Usage: stress [--part queue|cpu|cuda|all|selftest|repro] [--scale N (10)] [--seed N]
//               [--timeout S (300)] [--lenient]
// selftest: a deliberate race, for checking that the build reports one. The cuda part ends with
// repro_placer_after_reset (also alone: --part repro). --lenient: the defects listed below are
// counted instead of failing the run (for looking at an old build), and the repro is not run.
#include <dlfcn.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpu.hpp"
#include "engine.hpp"
#include "loader.hpp"
#include "queue.hpp"

using namespace aiocuda;
using Clock = std::chrono::steady_clock;

namespace {

struct Options {
    std::string part = "all";
    int scale = 10;
    unsigned seed = 1;
    int timeout_s = 300;
    bool strict = true;  // the defects below fail the run (and their repro scenarios run)
};
Options opt;

// ---- reporting ---------------------------------------------------------------------------------

std::atomic<int> g_failures{0};
std::mutex g_print_mu;

void say(const char* fmt, ...) {
    std::lock_guard<std::mutex> g(g_print_mu);
    va_list ap;
    va_start(ap, fmt);
    std::vfprintf(stdout, fmt, ap);
    va_end(ap);
    std::fputc('\n', stdout);
    std::fflush(stdout);
}

void fail(const char* fmt, ...) {
    int n = g_failures.fetch_add(1);
    if (n >= 20) return;  // the first ones say enough
    std::lock_guard<std::mutex> g(g_print_mu);
    std::fputs("FAIL: ", stdout);
    va_list ap;
    va_start(ap, fmt);
    std::vfprintf(stdout, fmt, ap);
    va_end(ap);
    std::fputc('\n', stdout);
    std::fflush(stdout);
}

// A hang cannot be checked and then continued from: say what and leave at once.
[[noreturn]] void fatal(const char* fmt, ...) {
    {
        std::lock_guard<std::mutex> g(g_print_mu);
        std::fputs("FAIL (fatal): ", stdout);
        va_list ap;
        va_start(ap, fmt);
        std::vfprintf(stdout, fmt, ap);
        va_end(ap);
        std::fputc('\n', stdout);
        std::fflush(stdout);
    }
    _exit(3);
}

// Defects of csrc/ that this harness found (not data races: TSan was clean on them), fixed since;
// their checks fail the run (--lenient counts them instead). A fourth cannot be tolerated (the
// emulator aborts the process on it): repro_placer_after_reset, also alone with --part repro.
enum OpenIssue {
    kErrorsOutOfOrder,    // detection.cpp pass() (failed lane watch), place_open(), and retire()
                          // passing over the open mark the placer was putting: finish() of one
                          // mark while earlier marks of its stream are pending: error completions
                          // reach the queue out of stream order
    kBrokenLaneHandle,    // detection.cpp pass(): a lane whose cuStreamCreate failed stays in the
                          // context's lanes with a null stream; later watches on it fail with
                          // CUDA_ERROR_INVALID_HANDLE (400) instead of the context's error
    kOldDriverDeviceWait, // device_waits.cpp device_waiter_run(): on drivers without cuCtxRecordEvent,
                          // device waits queued behind a cuCtxSynchronize that a reset ended get
                          // a fresh cuCtxSynchronize on the new context: success for dropped work
    kNumOpenIssues,
};
const char* const kOpenIssueNames[kNumOpenIssues] = {
    "error completions out of stream order (detection.cpp pass() lane failure, place_open failure, "
    "contexts.cpp retire() and the placer's taken mark)",
    "INVALID_HANDLE (400) from a lane whose stream creation failed (detection.cpp pass())",
    "device waits succeed after a reset on drivers without cuCtxRecordEvent "
    "(device_waits.cpp device_waiter_run())",
};
std::atomic<int> g_open_issues[kNumOpenIssues];

// True when a failed check is defect `i` and tolerated (counted: --lenient) in this run.
bool open_issue(OpenIssue i) {
    g_open_issues[i].fetch_add(1);
    return !opt.strict;
}

#define CHECK(cond, ...)              \
    do {                              \
        if (!(cond)) fail(__VA_ARGS__); \
    } while (0)

double secs_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}


// Waits for all of a set of threads at once (C++17 has no std::barrier).
class Barrier {
public:
    explicit Barrier(int n) : n_(n) {}
    void wait() {
        std::unique_lock<std::mutex> g(mu_);
        uint64_t gen = gen_;
        if (++arrived_ == n_) {
            arrived_ = 0;
            ++gen_;
            cv_.notify_all();
            return;
        }
        if (!cv_.wait_for(g, std::chrono::seconds(opt.timeout_s), [&] { return gen_ != gen; }))
            fatal("a barrier was never reached (a thread hangs)");
    }

private:
    std::mutex mu_;
    std::condition_variable cv_;
    int n_, arrived_ = 0;
    uint64_t gen_ = 0;
};

// ---- the consumer side of a Queue (what module.cpp's PyQueue does, without Python) --------------

class Consumer {
public:
    explicit Consumer(Queue* q) : q_(q), buf_(256) {}

    // Waits up to `timeout_ms` for the eventfd, then drains everything in batches of `max`
    // (1..256), handing each record to `fn(token, status)` and freeing it. Returns how many.
    // A poll that timed out although records were waiting is a lost wake-up (only checked for
    // long timeouts: a producer may sit between its push and its signal for a moment).
    size_t pump(int timeout_ms, size_t max, const std::function<void(uint64_t, int32_t)>& fn) {
        pollfd p{q_->fd(), POLLIN, 0};
        int r;
        do { r = ::poll(&p, 1, timeout_ms); } while (r < 0 && errno == EINTR);
        size_t total = 0;
        bool more = true;
        while (more) {
            size_t k = q_->drain(max, buf_.data(), &more);
            for (size_t i = 0; i < k; ++i) {
                Node* n = buf_[i];
                uint64_t token = n->token;
                int32_t status = n->status;
                free_node(n);  // its producer already dropped the queue reference
                fn(token, status);
            }
            total += k;
        }
        if (r == 0 && timeout_ms >= 2000 && total > 0)
            fail("lost wake-up: the eventfd stayed quiet for %d ms while %zu records waited",
                 timeout_ms, total);
        return total;
    }

    // One drain pass of at most `max` records, no waiting: leaves the rest where it is.
    size_t drain_once(size_t max) {
        bool more = false;
        size_t k = q_->drain(max, buf_.data(), &more);
        for (size_t i = 0; i < k; ++i) free_node(buf_[i]);
        return k;
    }

private:
    Queue* q_;
    std::vector<Node*> buf_;
};

// A record the consumer created and nothing will complete (a refused submission).
void discard(Node* n) {
    Queue* q = n->queue;
    free_node(n);
    q->release();
}

bool wait_live_nodes_zero(double seconds) {
    auto t0 = Clock::now();
    while (live_nodes() != 0) {
        if (secs_since(t0) > seconds) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
}

// ==== part 1: the completion queue ===============================================================

// A producer: takes records handed over by the consumer (through a mutex, as a cpu stream's
// submission does) and completes them, `status` = its index + 1.
struct Producer {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<Node*> inbox;
    bool done = false;
    std::thread th;
};

void part_queue() {
    auto t0 = Clock::now();
    const int P = 4;
    const uint64_t N = 50000ull * opt.scale;  // records per producer
    // -- phase 1: many producers, one consumer ----------------------------------------------------
    {
        Queue* q = Queue::create();
        Consumer c(q);
        std::vector<std::unique_ptr<Producer>> ps;
        for (int i = 0; i < P; ++i) ps.emplace_back(new Producer);
        for (int i = 0; i < P; ++i) {
            Producer* p = ps[i].get();
            p->th = std::thread([p, i] {
                std::mt19937 rng(opt.seed * 7919 + i);
                std::vector<Node*> work;
                for (;;) {
                    {
                        std::unique_lock<std::mutex> g(p->mu);
                        p->cv.wait(g, [&] { return p->done || !p->inbox.empty(); });
                        if (p->inbox.empty()) return;
                        work.swap(p->inbox);
                    }
                    for (Node* n : work) {
                        complete(n, i + 1);
                        if (rng() % 512 == 0) std::this_thread::yield();
                    }
                    work.clear();
                }
            });
        }
        std::vector<uint64_t> next_seq(P, 0), got(P, 0);
        uint64_t received = 0;
        auto on_record = [&](uint64_t token, int32_t status) {
            int pid = static_cast<int>(token >> 32);
            uint64_t seq = token & 0xffffffffu;
            ++received;
            if (pid < 0 || pid >= P) return fail("queue: bad token %llx", (unsigned long long)token);
            CHECK(status == pid + 1, "queue: token %llx has status %d", (unsigned long long)token, status);
            CHECK(seq == got[pid], "queue: producer %d: record %llu arrived when %llu was due "
                  "(lost, doubled or reordered)", pid, (unsigned long long)seq,
                  (unsigned long long)got[pid]);
            got[pid] = seq + 1;
        };
        std::mt19937 rng(opt.seed);
        uint64_t handed = 0;
        while (handed < N * P) {
            int pid = static_cast<int>(rng() % P);
            size_t chunk = 1 + rng() % 64;
            std::vector<Node*> nodes;
            for (size_t k = 0; k < chunk && next_seq[pid] < N; ++k)
                nodes.push_back(new_node(q, (static_cast<uint64_t>(pid) << 32) | next_seq[pid]++));
            handed += nodes.size();
            {
                std::lock_guard<std::mutex> g(ps[pid]->mu);
                ps[pid]->inbox.insert(ps[pid]->inbox.end(), nodes.begin(), nodes.end());
            }
            ps[pid]->cv.notify_one();
            if (rng() % 4 == 0) c.pump(0, 1 + rng() % 256, on_record);
        }
        for (auto& p : ps) {
            {
                std::lock_guard<std::mutex> g(p->mu);
                p->done = true;
            }
            p->cv.notify_one();
        }
        auto until = Clock::now() + std::chrono::seconds(opt.timeout_s / 2);
        while (received < N * P && Clock::now() < until) c.pump(5000, 1 + rng() % 256, on_record);
        for (auto& p : ps) p->th.join();
        CHECK(received == N * P, "queue: %llu of %llu records arrived", (unsigned long long)received,
              (unsigned long long)(N * P));
        CHECK(q->pushed() == N * P, "queue: pushed() says %llu", (unsigned long long)q->pushed());
        CHECK(q->signals() >= 1 && q->signals() <= q->pushed(), "queue: %llu signals for %llu pushes",
              (unsigned long long)q->signals(), (unsigned long long)q->pushed());
        say("queue: %llu records from %d producers, %llu eventfd signals",
            (unsigned long long)received, P, (unsigned long long)q->signals());
        q->release();
        CHECK(live_nodes() == 0, "queue: %lld records never freed", (long long)live_nodes());
    }
    // -- phase 2: the consumer closes the queue while records are being completed -----------------
    const int R = 200 * opt.scale;
    const int M = 500;  // records per producer per round
    uint64_t drained = 0;
    for (int round = 0; round < R; ++round) {
        Queue* q = Queue::create();
        Consumer c(q);
        std::vector<std::vector<Node*>> slices(P);
        for (int i = 0; i < P; ++i)
            for (int k = 0; k < M; ++k) slices[i].push_back(new_node(q, (uint64_t(i) << 32) | k));
        std::atomic<int> started{0};
        std::vector<std::thread> ts;
        for (int i = 0; i < P; ++i)
            ts.emplace_back([&, i] {
                std::mt19937 rng(opt.seed * 31 + round * 8 + i);
                started.fetch_add(1);
                for (Node* n : slices[i]) {
                    complete(n, 0);
                    if (rng() % 64 == 0) std::this_thread::yield();
                }
            });
        while (started.load() < P) std::this_thread::yield();
        std::mt19937 rng(opt.seed + round);
        // A few small drains leave a partly reversed stack and a backlog for the destructor.
        int passes = static_cast<int>(rng() % 4);
        for (int k = 0; k < passes; ++k) {
            if (rng() % 2) std::this_thread::yield();
            drained += c.drain_once(1 + rng() % 8);
        }
        q->release();  // closed: records still in flight keep the queue until they land
        for (auto& t : ts) t.join();
        CHECK(live_nodes() == 0, "queue close, round %d: %lld records never freed", round,
              (long long)live_nodes());
    }
    say("queue: %d closes with records in flight (%llu drained before the close)", R,
        (unsigned long long)drained);
    say("queue: done in %.1f s", secs_since(t0));
}

// ==== part 2: the cpu backend ====================================================================

void part_cpu() {
    auto t0 = Clock::now();
    constexpr int S = 4, E = 4;
    const int N = 20000 * opt.scale;  // submissions per round
    const int R = 10;
    Queue* q = Queue::create();
    Consumer c(q);
    uint64_t total_markers = 0, total_refused = 0;
    for (int round = 0; round < R; ++round) {
        std::mt19937 rng(opt.seed * 101 + round);
        std::vector<std::unique_ptr<CpuStream>> ss;
        for (int i = 0; i < S; ++i) ss.emplace_back(new CpuStream);
        std::vector<std::shared_ptr<CpuEventState>> evs;
        for (int e = 0; e < E; ++e) evs.push_back(std::make_shared<CpuEventState>());
        struct Marker {
            int stream;
            uint64_t need[E];
            int count = 0;
        };
        std::vector<Marker> markers;
        uint64_t need[S][E] = {};
        std::vector<uint64_t> last_done(S, 0);  // per stream: 1 + the last marker drained
        constexpr uint64_t kExitToken = ~0ull - 1;  // stream 1's close_notify record
        int exit_records = 0;
        auto on_record = [&](uint64_t token, int32_t status) {
            if (token == kExitToken) {  // every marker of stream 1 was completed before it
                ++exit_records;
                CHECK(status == kOk, "cpu: the exit record has status %d", status);
                for (size_t t = 0; t < markers.size(); ++t)
                    CHECK(markers[t].stream != 1 || markers[t].count == 1,
                          "cpu: stream 1's exit record came before its marker %zu", t);
                return;
            }
            if (token >= markers.size()) return fail("cpu: bad token %llu", (unsigned long long)token);
            Marker& m = markers[token];
            CHECK(status == kOk, "cpu: marker %llu has status %d", (unsigned long long)token, status);
            CHECK(++m.count == 1, "cpu: marker %llu completed %d times", (unsigned long long)token, m.count);
            CHECK(token + 1 > last_done[m.stream], "cpu: stream %d completed marker %llu after %llu",
                  m.stream, (unsigned long long)token, (unsigned long long)(last_done[m.stream] - 1));
            last_done[m.stream] = token + 1;
            for (int e = 0; e < E; ++e) {
                uint64_t reached;
                {
                    std::lock_guard<std::mutex> g(evs[e]->mu);
                    reached = evs[e]->completed;
                }
                CHECK(reached >= m.need[e], "cpu: marker %llu ran before event %d reached %llu "
                      "(it is at %llu)", (unsigned long long)token, e,
                      (unsigned long long)m.need[e], (unsigned long long)reached);
            }
        };
        // Another thread closes stream 0 while this one submits to it (and then to the others),
        // somewhere in the second half of the round.
        std::atomic<int> submitted{0};
        std::thread closer([&, at = N / 2 + static_cast<int>(rng() % (N / 2))] {
            while (submitted.load(std::memory_order_relaxed) < at) std::this_thread::yield();
            ss[0]->close();
        });
        auto refused = [&](const std::string& why, int s) {
            ++total_refused;
            CHECK(s == 0 && why.find("closed") != std::string::npos,
                  "cpu: stream %d refused a submission: %s", s, why.c_str());
        };
        for (int i = 0; i < N; ++i) {
            int s = static_cast<int>(rng() % S);
            int e = static_cast<int>(rng() % E);
            unsigned op = rng() % 100;
            std::string why;
            if (op < 55) {
                Marker m{s, {}};
                std::copy(need[s], need[s] + E, m.need);
                Node* n = new_node(q, markers.size());
                why = ss[s]->marker(n);
                if (why.empty()) markers.push_back(m);
                else discard(n), refused(why, s);
            } else if (op < 75) {
                uint64_t gen = evs[e]->recorded + 1;  // `recorded`: this (the loop) thread only
                why = ss[s]->record(evs[e], gen);
                if (why.empty()) evs[e]->recorded = gen, need[s][e] = std::max(need[s][e], gen);
                else refused(why, s);
            } else if (op < 95) {
                uint64_t gen = evs[e]->recorded;
                why = ss[s]->wait_event(evs[e], gen);
                if (why.empty()) need[s][e] = std::max(need[s][e], gen);
                else refused(why, s);
            } else {
                why = ss[s]->delay(1e-6 * (rng() % 50));
                if (!why.empty()) refused(why, s);
            }
            if (i % 32 == 0) c.pump(0, 1 + rng() % 64, on_record);
            submitted.store(i + 1, std::memory_order_relaxed);
        }
        // Close while busy: from here (1, 2), concurrently with the closer (0), and by
        // destruction (3); none of them waits. Stream 1's worker completes a record when it
        // exits, after all its work; stream 2's and stream 0's are waited for.
        ss[0]->close();
        Node* exit_node = new_node(q, kExitToken);
        CHECK(ss[1]->close_notify(exit_node).empty(), "cpu: close_notify refused");
        ss[2]->close();
        closer.join();
        ss[3].reset();
        for (int s : {0, 2})
            CHECK(ss[s]->wait_closed(opt.timeout_s / 4), "cpu: stream %d's worker never exited", s);
        for (int s = 0; s < 3; ++s) {
            CHECK(ss[s]->closed(), "cpu: stream %d is not closed", s);
            Node* n = new_node(q, ~0ull);
            std::string why = ss[s]->marker(n);
            CHECK(!why.empty(), "cpu: a closed stream accepted a marker");
            if (why.empty()) fatal("cannot continue");
            discard(n);
        }
        auto completed = [&] {
            size_t k = 0;
            for (auto& m : markers) k += m.count;
            return k;
        };
        auto until = Clock::now() + std::chrono::seconds(opt.timeout_s / 4);
        while ((completed() < markers.size() || exit_records == 0) && Clock::now() < until)
            c.pump(5000, 64, on_record);
        size_t got = completed();
        CHECK(got == markers.size(), "cpu round %d: %zu of %zu markers completed", round, got,
              markers.size());
        CHECK(exit_records == 1, "cpu round %d: %d exit records", round, exit_records);
        CHECK(ss[1]->wait_closed(0), "cpu: stream 1 notified its exit before exiting");
        // Stream 3, destroyed without a wait, may still run its last records and waits.
        CHECK(cpu_wait_workers(opt.timeout_s / 4), "cpu: %lld workers never exited",
              (long long)cpu_workers());
        for (int e = 0; e < E; ++e) CHECK(evs[e]->done(), "cpu: event %d never reached its last record", e);
        total_markers += markers.size();
        ss.clear();  // destroys the closed streams
    }
    q->release();
    CHECK(wait_live_nodes_zero(5), "cpu: %lld records never freed", (long long)live_nodes());
    say("cpu: %d rounds, %llu markers completed, %llu submissions refused after a close", R,
        (unsigned long long)total_markers, (unsigned long long)total_refused);
    say("cpu: done in %.1f s", secs_since(t0));
}

// ==== part 3: the cuda engine on the driver emulator =============================================

constexpr int kIllegalAddress = 700, kContextIsDestroyed = 709, kNotReady = 600;

// The emulator's entry points and controls, from the library aiocuda loads (same path: dlopen
// returns the same instance).
struct Emu {
    int (*retain)(void**, int);
    int (*reset)(int);
    int (*push)(void*);
    int (*pop)(void**);
    int (*stream_create)(void**, unsigned);
    int (*stream_destroy)(void*);
    int (*event_create)(void**, unsigned);
    int (*event_record)(void*, void*);
    int (*event_destroy)(void*);
    int (*sleep)(void*, long long);
    void (*inject)(int, int);
    long long (*live)(const char*);
    void* ctx[2] = {nullptr, nullptr};

    void load() {
        const char* path = std::getenv("AIOCUDA_LIBCUDA");
        if (!path || !*path) fatal("set AIOCUDA_LIBCUDA to the driver emulator");
        void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!lib) fatal("dlopen %s: %s", path, dlerror());
        auto sym = [&](auto& slot, const char* name) {
            void* p = dlsym(lib, name);
            if (!p) fatal("the emulator has no %s", name);
            slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(p);
        };
        sym(retain, "cuDevicePrimaryCtxRetain");
        sym(reset, "cuDevicePrimaryCtxReset_v2");
        sym(push, "cuCtxPushCurrent_v2");
        sym(pop, "cuCtxPopCurrent_v2");
        sym(stream_create, "cuStreamCreate");
        sym(stream_destroy, "cuStreamDestroy_v2");
        sym(event_create, "cuEventCreate");
        sym(event_record, "cuEventRecord");
        sym(event_destroy, "cuEventDestroy_v2");
        sym(sleep, "emu_enqueue_sleep");
        sym(inject, "emu_inject_error");
        sym(live, "emu_live");
    }
    void* stream(int dev, unsigned flags) {
        void* s = nullptr;
        if (push(ctx[dev]) != 0) fatal("cuCtxPushCurrent failed");
        int r = stream_create(&s, flags);
        pop(nullptr);
        if (r != 0) fatal("cuStreamCreate: %d", r);
        return s;
    }
    void* event_on(int dev, void* s) {  // a foreign event (as torch makes one), recorded on s
        void* ev = nullptr;
        push(ctx[dev]);
        int r = event_create(&ev, 0);
        if (r == 0) r = event_record(ev, s);
        pop(nullptr);
        if (r != 0) fatal("foreign event on device %d: %d", dev, r);
        return ev;
    }
};
Emu emu;

// Whether the emulator plays a driver older than 12.5 (no cuCtxRecordEvent: device waits are
// cuCtxSynchronize threads).
bool old_driver() {
    const char* v = std::getenv("AIOCUDA_EMU_DRIVER_VERSION");
    return v && *v && std::atoi(v) < 12050;
}

// Reset as conftest.py's Emu.reset_device does: the engine is held between two passes, standing
// for cuda.h's "no other module in the process is using the device". Then the program retains the
// context again, as a runtime does before its next use (a reset leaves it inactive until then).
void reset_device(int dev) {
    cuda::hold(true);
    int r = emu.reset(dev);
    void* again = nullptr;
    if (r == 0 && emu.retain(&again, dev) != 0) fatal("cuDevicePrimaryCtxRetain after the reset");
    cuda::hold(false);
    if (r != 0) fatal("cuDevicePrimaryCtxReset: %d", r);
}

enum WaitKind : uint8_t { kStreamWait, kRecordWait, kDeviceWait, kForeignWait };

struct Wait {
    WaitKind kind;
    int dev;
    int slot;        // the stream it is ordered on (-1: none)
    int want;        // expected status; -1: 0 or the phase's error (raced with the error)
    int count = 0;
    int status = -1;
    void* foreign = nullptr;  // destroyed once completed (when its context still exists)
};

struct StreamSlot {
    void* h;
    int dev;
    int id;  // unique across the run: completion order is checked per id
};

void* g_shared = nullptr;  // a device-1 stream every loop thread waits on too
std::atomic<bool> g_injected{false};

// One event loop: its own Queue, its own streams, the waits it submitted and their checks.
class Loop {
public:
    explicit Loop(int idx)
        : idx_(idx), rng_(opt.seed * 1009 + idx), q_(Queue::create()), c_(q_),
          next_slot_(idx * 100000) {}
    ~Loop() { q_->release(); }

    void make_streams() {
        a_ = slot(emu.stream(0, 0), 0);
        b_ = slot(emu.stream(0, 1), 0);  // non-blocking
        d_ = slot(emu.stream(1, 0), 1);
        shared_ = slot(g_shared, 1);
    }
    // After a reset of device 0 its streams and events were destroyed with it: never touch
    // them again.
    void forget_device0_events() {
        for (auto& w : waits_)
            if (w.foreign && w.dev == 0) w.foreign = nullptr;
    }
    void forget_device0() {
        forget_device0_events();
        a_ = slot(emu.stream(0, 0), 0);
        b_ = slot(emu.stream(0, 1), 0);
        for (auto it = marks_.begin(); it != marks_.end();)
            if (it->dev == 0) {
                cuda::mark_release(it->m);  // native memory only: no driver call
                it = marks_.erase(it);
            } else {
                ++it;
            }
    }
    void destroy_streams() {
        for (StreamSlot* s : {&a_, &b_, &d_}) emu.stream_destroy(s->h);
    }

    // Random waits of every kind on every stream, with short kernels in between.
    void stress(int n) {
        for (int i = 0; i < n; ++i) {
            StreamSlot& s = pick();
            unsigned op = rng_() % 100;
            if (op < 20) {
                emu.sleep(s.h, rng_() % 300);
            } else if (op < 55) {
                submit(kStreamWait, s, 0);
            } else if (op < 67) {
                submit(kRecordWait, s, 0);
            } else if (op < 75) {
                submit(kDeviceWait, s, 0);
            } else if (op < 88) {
                submit(kForeignWait, s, 0);
            } else if (!marks_.empty()) {
                size_t k = rng_() % marks_.size();
                std::string why;
                cuda::Mark* m = marks_[k].m;
                int r = cuda::mark_query(m, &why);
                CHECK(r == 0 || r == kNotReady, "loop %d: mark_query: %d %s", idx_, r, why.c_str());
                if (rng_() % 8 == 0) {
                    r = cuda::mark_synchronize(m, &why);
                    CHECK(r == 0, "loop %d: mark_synchronize: %d %s", idx_, r, why.c_str());
                }
                cuda::mark_release(m);
                marks_.erase(marks_.begin() + k);
            }
            if (i % 16 == 0) pump(0);
        }
        settle(phase_);
        release_marks();
    }

    // Long work on device 0, waits behind it of every kind; short work and waits on device 1.
    // What device 0's waits end with is the caller's event (`want`: a sticky error, a reset).
    void pending_behind_long_work(int k, int want) {
        emu.sleep(a_.h, 5'000'000);
        emu.sleep(d_.h, 20'000);
        for (int i = 0; i < k; ++i) {
            submit(kStreamWait, a_, want);
            submit(kRecordWait, a_, want);
            submit(kForeignWait, a_, want);
            submit(kStreamWait, d_, 0);
            submit(kRecordWait, shared_, 0);
            submit(kForeignWait, d_, 0);
            if (i % 8 == 0) submit(kDeviceWait, a_, want), submit(kDeviceWait, d_, 0);
        }
    }
    // Loop 0, while the error is injected: waits that race with it (either outcome is right,
    // but each accepted one completes exactly once).
    void race_the_error() {
        int after = 0;
        while (after < 50) {
            if (g_injected.load()) ++after;
            submit(rng_() % 2 ? kStreamWait : kRecordWait, b_, -1);
            if (rng_() % 4 == 0) emu.sleep(b_.h, rng_() % 200);
            pump(0);
        }
    }
    void check_refused_after_error() {
        Node* n = new_node(q_, ~0ull);
        std::string why;
        int r = cuda::wait_stream(reinterpret_cast<uintptr_t>(a_.h), -1, n, &why);
        CHECK(r == kIllegalAddress, "loop %d: a wait on a broken context returned %d", idx_, r);
    }
    // Every mark of `dev` reports `want` (its context is broken or was reset).
    void check_marks(int dev, int want) {
        for (auto& mk : marks_) {
            if (mk.dev != dev || mk.want < 0) continue;
            std::string why;
            int r = cuda::mark_query(mk.m, &why);
            CHECK(r == want, "loop %d: a mark of device %d queried %d, not %d", idx_, dev, r, want);
        }
    }

    // Waits until every accepted wait completed; checks them; destroys finished foreign events.
    void settle(const char* phase) {
        phase_ = phase;
        auto until = Clock::now() + std::chrono::seconds(opt.timeout_s / 4);
        while (outstanding_ > 0 && Clock::now() < until) pump(5000);
        if (outstanding_ > 0) {
            auto st = cuda::stats();
            fatal("loop %d, %s: %zu waits never completed (engine: %zu pending, %zu marks)", idx_,
                  phase, outstanding_, st.pending, st.marks);
        }
        for (auto& w : waits_) {
            CHECK(w.count == 1, "loop %d, %s: a wait completed %d times", idx_, phase, w.count);
            bool ok = w.want >= 0 ? w.status == w.want
                                  : (w.status == 0 || w.status == error_);
            if (!ok && w.want == kIllegalAddress && w.status == 400)
                ok = open_issue(kBrokenLaneHandle);
            if (!ok && w.want == kContextIsDestroyed && w.status == 0 && w.kind == kDeviceWait &&
                old_driver())
                ok = open_issue(kOldDriverDeviceWait);
            CHECK(ok, "loop %d, %s: a %s wait on device %d ended with %d, not %d", idx_, phase,
                  kind_name(w.kind), w.dev, w.status, w.want);
            if (w.foreign) emu.event_destroy(w.foreign);
        }
        base_ += waits_.size();
        total_ += waits_.size();
        waits_.clear();
    }
    void release_marks() {
        for (auto& mk : marks_) cuda::mark_release(mk.m);
        marks_.clear();
    }
    void set_error(int e) { error_ = e; }
    void set_phase(const char* p) { phase_ = p; }
    size_t total() const { return total_; }
    size_t refused() const { return refused_; }

private:
    static const char* kind_name(WaitKind k) {
        return k == kStreamWait ? "stream" : k == kRecordWait ? "record" : k == kDeviceWait ? "device"
                                                                                            : "foreign";
    }
    StreamSlot slot(void* h, int dev) { return StreamSlot{h, dev, next_slot_++}; }
    StreamSlot& pick() {
        switch (rng_() % 5) {
            case 0: return a_;
            case 1: return b_;
            case 2: return d_;
            default: return shared_;
        }
    }

    void submit(WaitKind kind, StreamSlot& s, int want) {
        uint64_t token = base_ + waits_.size();
        Wait w{kind, s.dev, kind == kStreamWait || kind == kRecordWait ? s.id : -1, want};
        Node* n = new_node(q_, token);
        std::string why;
        int r;
        uintptr_t h = reinterpret_cast<uintptr_t>(s.h);
        switch (kind) {
            case kStreamWait: r = cuda::wait_stream(h, -1, n, &why); break;
            case kRecordWait: {
                cuda::Mark* m = nullptr;
                r = cuda::record(h, -1, n, &m, &why);
                if (r == 0) marks_.push_back(MarkRef{m, s.dev, want});
                break;
            }
            case kDeviceWait: r = cuda::wait_device(s.dev, n, &why); break;
            default:
                w.foreign = emu.event_on(s.dev, s.h);
                r = cuda::wait_event(reinterpret_cast<uintptr_t>(w.foreign), s.dev, n, &why);
                if (r != 0) {  // (on a broken context: destroyed, and the error returned)
                    emu.event_destroy(w.foreign);
                    w.foreign = nullptr;
                }
        }
        if (r != 0) {  // the engine freed n
            ++refused_;
            CHECK(want == -1 && r == error_, "loop %d: a %s wait on device %d was refused: %d %s",
                  idx_, kind_name(kind), s.dev, r, why.c_str());
            return;
        }
        waits_.push_back(w);
        ++outstanding_;
    }

    void pump(int timeout_ms) {
        c_.pump(timeout_ms, 1 + rng_() % 128, [&](uint64_t token, int32_t status) {
            if (token < base_ || token - base_ >= waits_.size())
                return fail("loop %d: unknown token %llu", idx_, (unsigned long long)token);
            Wait& w = waits_[token - base_];
            ++w.count;
            w.status = status;
            --outstanding_;
            if (w.slot >= 0) {
                Last& last = last_[w.slot];
                // Two failures with one error out of order: defect kErrorsOutOfOrder.
                bool tolerated = token + 1 <= last.token && status != 0 &&
                                 status == last.status && open_issue(kErrorsOutOfOrder);
                CHECK(token + 1 > last.token || tolerated,
                      "loop %d, %s: stream %d completed %s wait %llu (status %d) after %s wait %llu "
                      "(status %d): out of stream order", idx_, phase_, w.slot, kind_name(w.kind),
                      (unsigned long long)token, status, kind_name(last.kind),
                      (unsigned long long)(last.token - 1), last.status);
                if (token + 1 > last.token) last = Last{token + 1, w.kind, status};
            }
        });
    }

    int idx_;
    std::mt19937 rng_;
    Queue* q_;
    Consumer c_;
    StreamSlot a_{}, b_{}, d_{}, shared_{};
    std::vector<Wait> waits_;
    struct MarkRef {
        cuda::Mark* m;
        int dev;
        int want;
    };
    std::vector<MarkRef> marks_;  // aiocuda.Event's share of a mark, until released
    struct Last {
        uint64_t token;  // 1 + the last wait token completed
        WaitKind kind;
        int status;
    };
    std::map<int, Last> last_;  // per stream slot
    uint64_t base_ = 0;             // token of waits_[0]
    size_t outstanding_ = 0, total_ = 0, refused_ = 0;
    int error_ = 0;                 // the error submissions may race with (-1 waits)
    const char* phase_ = "stress";  // for messages
    int next_slot_;
};

// A fixed defect, deterministic (the emulator aborted the process on it).
// placement.cpp placer_run() / place_open(): a timeline queued for its placer while the engine is held
// is placed after hold(false) with only `cs->retired` checked; a reset during the hold left the
// context state unretired (only the engine thread's next pass, or a new wait, notices the new
// cuCtxGetId), so place_open() calls cuStreamIsCapturing (then cuEventRecord with pooled events)
// on handles the reset destroyed: undefined behaviour in the driver. Sequence: more than
// kMarksInFlight (8) waits on a stream with a short kernel (an open mark), hold, the kernel ends
// and the host functions (which run while the engine is held) pass the marks and queue the open
// mark for placing, reset, release. Right: no destroyed handle is touched, and every wait
// completes once, in stream order, with 0 (its mark was seen to pass before the reset) or
// CONTEXT_IS_DESTROYED (the open mark's: never placed).
// After hold(false) the engine thread's pass (which retires the context first) and the placer
// race: repeated, as one round shows it in most runs.
void repro_placer_after_reset() {
    say("cuda: repro: a reset while the placer has an open mark queued (callback strategy), 5 rounds");
    cuda::set_strategy(cuda::Strategy::kCallback);
    for (int round = 0; round < 5; ++round) {
        Queue* q = Queue::create();
        Consumer c(q);
        void* s = emu.stream(0, 0);
        emu.sleep(s, 100'000);
        const int n = 12;
        for (int i = 0; i < n; ++i) {
            std::string why;
            int r = cuda::wait_stream(reinterpret_cast<uintptr_t>(s), -1, new_node(q, i), &why);
            if (r != 0) fatal("repro: wait_stream: %d %s", r, why.c_str());
        }
        // The engine launches the marks' host functions first (it makes its lanes on first use).
        std::this_thread::sleep_for(std::chrono::milliseconds(40));
        cuda::hold(true);
        std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the kernel ends meanwhile
        void* again = nullptr;  // and retained again, as reset_device() does
        if (emu.reset(0) != 0 || emu.retain(&again, 0) != 0) fatal("repro: reset failed");
        cuda::hold(false);
        std::vector<int> status(n, -1);
        int got = 0;
        auto until = Clock::now() + std::chrono::seconds(10);
        while (got < n && Clock::now() < until)
            got += static_cast<int>(c.pump(2000, 64, [&](uint64_t t, int32_t st) { status[t] = st; }));
        CHECK(got == n, "repro: %d of %d waits completed", got, n);
        for (int i = 0; i < n; ++i) {
            CHECK(status[i] == 0 || status[i] == kContextIsDestroyed, "repro: wait %d ended with %d",
                  i, status[i]);
            CHECK(i == 0 || status[i - 1] == 0 || status[i] != 0, "repro: wait %d succeeded after %d "
                  "failed", i, i - 1);
        }
        CHECK(status[n - 1] == kContextIsDestroyed, "repro: the open mark's waits ended with %d",
              status[n - 1]);
        q->release();
    }
    say("cuda: repro passed: the placer did not touch the reset context's handles");
}

void cuda_setup() {
    emu.load();
    const cuda::DriverInfo& info = cuda::load();
    if (!info.available) fatal("cuda: the emulator did not load: %s", info.reason.c_str());
    if (info.device_count < 2) fatal("cuda: the emulator has %d devices; 2 are needed", info.device_count);
    for (int d = 0; d < 2; ++d)
        if (emu.retain(&emu.ctx[d], d) != 0) fatal("cuDevicePrimaryCtxRetain(%d)", d);
}

void part_cuda() {
    auto t0 = Clock::now();
    cuda_setup();
    g_shared = emu.stream(1, 0);

    const int T = 3;  // loop threads (and main, which injects, resets and switches strategies)
    const int N = 700 * opt.scale;
    const int K = 12;
    const int cycles = 1 + opt.scale / 4;  // error-reset cycles per strategy
    Barrier bar(T + 1);
    std::vector<std::unique_ptr<Loop>> loops;
    for (int i = 0; i < T; ++i) loops.emplace_back(new Loop(i));
    std::atomic<bool> toggling{false};

    // The script every loop thread follows, in step with main through the barrier.
    auto loop_main = [&](int i) {
        Loop& L = *loops[i];
        L.make_streams();
        for (int strat = 0; strat < 4; ++strat) {  // callback, poll, flag, switching
            bar.wait();
            L.stress(N);
            bar.wait();
        }
        for (int cycle = 0; cycle < 3 * cycles; ++cycle) {
            const char* const errs[] = {"sticky error, callback", "sticky error, poll",
                                        "sticky error, flag"};
            const char* const resets[] = {"reset, callback", "reset, poll", "reset, flag"};
            const char* err = errs[cycle % 3];
            const char* rst = resets[cycle % 3];
            // A sticky error while waits are pending, then a reset, then recovery.
            L.set_error(kIllegalAddress);
            L.set_phase(err);
            bar.wait();
            L.pending_behind_long_work(K, kIllegalAddress);
            bar.wait();  // all submitted: main injects the error
            if (i == 0) L.race_the_error();
            bar.wait();
            L.settle(err);
            L.check_marks(0, kIllegalAddress);
            L.check_refused_after_error();
            bar.wait();  // main resets device 0
            bar.wait();
            L.forget_device0();
            L.set_error(0);
            L.set_phase("stress after a reset");
            L.stress(N / 4);
            // A reset while waits are pending, then recovery.
            L.set_phase(rst);
            bar.wait();
            L.pending_behind_long_work(K, kContextIsDestroyed);
            bar.wait();  // main resets device 0
            bar.wait();
            L.forget_device0_events();
            L.settle(rst);
            L.check_marks(0, kContextIsDestroyed);
            L.forget_device0();
            L.set_phase("stress after a reset");
            L.stress(N / 4);
            bar.wait();
        }
        L.release_marks();
        L.destroy_streams();
    };
    std::vector<std::thread> ts;
    for (int i = 0; i < T; ++i) ts.emplace_back(loop_main, i);

    const char* names[] = {"callback", "poll", "flag", "switching"};
    for (int strat = 0; strat < 4; ++strat) {
        auto t1 = Clock::now();
        if (strat < 3) cuda::set_strategy(static_cast<cuda::Strategy>(strat));
        bar.wait();
        if (strat == 3) {  // switch strategies while the loops wait
            std::mt19937 rng(opt.seed);
            toggling = true;
            std::thread toggler([&] {
                int s = 0;
                while (toggling.load()) {
                    cuda::set_strategy(static_cast<cuda::Strategy>(s = (s + 1) % 3));
                    std::this_thread::sleep_for(std::chrono::microseconds(200 + rng() % 2000));
                }
            });
            bar.wait();
            toggling = false;
            toggler.join();
        } else {
            bar.wait();
        }
        say("cuda: stress, %s strategy, %.1f s", names[strat], secs_since(t1));
    }
    for (int cycle = 0; cycle < 3 * cycles; ++cycle) {
        auto t1 = Clock::now();
        int strat = cycle % 3;
        cuda::set_strategy(static_cast<cuda::Strategy>(strat));
        bar.wait();
        bar.wait();  // every loop has waits pending behind long work on device 0
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        emu.inject(0, kIllegalAddress);
        g_injected = true;
        bar.wait();
        bar.wait();  // every wait ended
        g_injected = false;
        reset_device(0);
        bar.wait();
        bar.wait();  // recovered
        bar.wait();  // waits pending again
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        reset_device(0);
        bar.wait();
        bar.wait();  // recovered again
        say("cuda: sticky error, reset and recovery, %s strategy, %.1f s", names[strat], secs_since(t1));
    }
    for (auto& t : ts) t.join();

    auto until = Clock::now() + std::chrono::seconds(10);
    cuda::Stats st = cuda::stats();
    while ((st.pending || st.marks) && Clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        st = cuda::stats();
    }
    CHECK(st.pending == 0 && st.marks == 0, "cuda: the engine still has %zu pending, %zu marks",
          st.pending, st.marks);
    size_t total = 0, refused = 0;
    for (auto& L : loops) total += L->total(), refused += L->refused();
    loops.clear();
    emu.stream_destroy(g_shared);
    CHECK(wait_live_nodes_zero(5), "cuda: %lld records never freed", (long long)live_nodes());
    say("cuda: %zu waits completed and checked, %zu refused while the context was broken; engine: "
        "%zu events, %zu lanes, %zu threads", total, refused, st.events, st.lanes, st.threads);
    if (opt.strict) repro_placer_after_reset();
    say("cuda: done in %.1f s", secs_since(t0));
}

// A deliberate data race, to show that a TSan build reports (scripts/tsan-test must fail).
void part_selftest() {
    static int counter = 0;
    std::thread t([] { for (int i = 0; i < 1000; ++i) ++counter; });
    for (int i = 0; i < 1000; ++i) ++counter;
    t.join();
    say("selftest: counter %d (a TSan build reports the race above)", counter);
}

}  // namespace

int main(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto val = [&]() -> std::string {
            if (i + 1 >= argc) fatal("%s needs a value", a.c_str());
            return argv[++i];
        };
        if (a == "--part") opt.part = val();
        else if (a == "--scale") opt.scale = std::max(1, std::atoi(val().c_str()));
        else if (a == "--seed") opt.seed = static_cast<unsigned>(std::atoll(val().c_str()));
        else if (a == "--timeout") opt.timeout_s = std::max(10, std::atoi(val().c_str()));
        else if (a == "--lenient") opt.strict = false;
        else fatal("unknown argument %s (--part queue|cpu|cuda|all|selftest|repro, --scale N, --seed N, "
                   "--timeout S, --lenient)",
                   a.c_str());
    }
    // A watchdog: a hang anywhere ends the run with a failure instead of blocking CI.
    std::thread([] {
        std::this_thread::sleep_for(std::chrono::seconds(opt.timeout_s));
        fatal("the harness ran longer than %d s", opt.timeout_s);
    }).detach();
    say("stress: part %s, scale %d, seed %u", opt.part.c_str(), opt.scale, opt.seed);
    auto t0 = Clock::now();
    bool all = opt.part == "all";
    if (all || opt.part == "queue") part_queue();
    if (all || opt.part == "cpu") part_cpu();
    if (all || opt.part == "cuda") part_cuda();
    if (opt.part == "selftest") part_selftest();
    if (opt.part == "repro") cuda_setup(), repro_placer_after_reset();
    for (int i = 0; i < kNumOpenIssues; ++i)
        if (int k = g_open_issues[i].load())
            say("DEFECT (%s): %d occurrence%s: %s", opt.strict ? "failed" : "tolerated", k,
                k == 1 ? "" : "s", kOpenIssueNames[i]);
    int f = g_failures.load();
    say("stress: %s in %.1f s (%d failure%s)", f ? "FAILED" : "passed", secs_since(t0), f,
        f == 1 ? "" : "s");
    return f ? 1 : 0;
}
