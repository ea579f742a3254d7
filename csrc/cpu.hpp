// The cpu backend: in-order native worker threads with CUDA stream semantics.
#pragma once

#include <Python.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "queue.hpp"

namespace aiocuda {

// A CPU event: the generation last recorded (loop thread) and the generation reached (workers).
struct CpuEventState {
    std::mutex mu;
    std::condition_variable cv;
    uint64_t recorded = 0;
    uint64_t completed = 0;
    uint32_t epoch = 0;  // g_fork_epoch when last recorded: a parent's pending record never ends
    // The worker of the stream that took the last record. A wait on that worker for a record not
    // reached would wait for itself: the worker runs in order and the record is behind the wait.
    std::thread::id recorder;
    void reach(uint64_t gen);
    void wait_for(uint64_t gen);
    bool wait_for(uint64_t gen, double timeout_s);  // false if not reached in time
    bool done();
    // Recorded in the parent before fork() and not reached then: the parent's worker, which
    // would reach it, does not exist in this process.
    bool lost() {
        std::lock_guard<std::mutex> g(mu);
        return completed < recorded && epoch != g_fork_epoch.load(std::memory_order_relaxed);
    }
    uint64_t last_recorded() {  // any thread
        std::lock_guard<std::mutex> g(mu);
        return recorded;
    }
};

// Whether the calling thread is a cpu-backend stream's worker.
bool on_cpu_worker();
// Worker threads that have not exited yet, of every stream (closed or not, collected or not).
int64_t cpu_workers();
void cpu_fail_thread_starts(int n);  // tests: fail the next n worker starts as the system would
// Waits up to `timeout_s` for every worker to exit; true if none is left. Call without the GIL.
bool cpu_wait_workers(double timeout_s);
// In a forked child: no worker of the parent exists here.
void cpu_after_fork_in_child();

class CpuStream {
public:
    CpuStream();
    ~CpuStream();  // closes; never waits: the work already submitted finishes in the background

    // Loop thread. Each returns an empty string or the reason it could not submit.
    std::string marker(Node* n);
    // Runs fn(*args, **kwargs) on the worker under the GIL; stores the outcome in outcomes[token].
    // The references are stolen. With n == nullptr (and outcomes == nullptr) nothing waits for
    // the call: an exception goes to sys.unraisablehook.
    std::string call(Node* n, PyObject* fn, PyObject* args, PyObject* kwargs, PyObject* outcomes);
    std::string record(const std::shared_ptr<CpuEventState>& ev, uint64_t gen);
    std::string wait_event(const std::shared_ptr<CpuEventState>& ev, uint64_t gen);
    std::string delay(double seconds);
    // Stops taking work; never waits (the worker runs what was submitted, then exits).
    // Idempotent, any thread.
    void close();
    // Closes, and completes `n` once the worker has run everything submitted and exited.
    // Returns an empty string or the reason it could not (then `n` is the caller's).
    std::string close_notify(Node* n);
    // Waits up to `timeout_s` for the worker to exit after close(); true once it has. True at
    // once on the worker itself (it cannot wait for itself; it exits after the call returns)
    // and in a forked child (the worker does not exist there). Call without the GIL.
    bool wait_closed(double timeout_s);
    bool closed();
    std::thread::id worker() const { return worker_id_; }
    bool on_worker() const { return std::this_thread::get_id() == worker_id_; }
    // Work submitted and not run yet (lock-free; a snapshot). A stream whose worker has just
    // finished its work is still awake for a few microseconds: the cheapest one to give more.
    uint64_t pending() const;

private:
    enum class Kind : uint8_t { Marker, Call, Record, Wait, Delay };
    struct Item {
        Kind kind;
        Node* node = nullptr;
        PyObject* fn = nullptr;
        PyObject* args = nullptr;
        PyObject* kwargs = nullptr;
        PyObject* outcomes = nullptr;
        std::shared_ptr<CpuEventState> ev;
        uint64_t gen = 0;
        double seconds = 0;
    };
    // Shared with the worker thread, which may outlive this object: the last reference to a
    // stream can be dropped by a call running on its own worker.
    struct Shared {
        std::mutex mu;
        std::condition_variable cv;
        std::deque<Item> items;
        std::atomic<uint64_t> enqueued{0};  // lets the idle worker spin without the lock
        std::atomic<uint64_t> finished{0};  // items run: enqueued - finished are pending
        bool sleeping = false;              // the worker waits on cv: a submit must notify
        bool closing = false;
        bool exited = false;          // the worker has run everything and is gone
        std::condition_variable exit_cv;  // notified when `exited` is set
        std::vector<Node*> on_exit;   // completed when the worker exits (close_notify)
        uint64_t submitted = 0;
    };
    std::string enqueue(Item&& item);
    static void run(Shared& sh);
    static void run_call(Item& it, std::atomic<uint64_t>& finished);

    bool forked() const { return epoch_ != g_fork_epoch.load(std::memory_order_relaxed); }

    std::shared_ptr<Shared> sh_;
    uint32_t epoch_;
    std::thread::id worker_id_;  // the worker is detached at birth: nothing ever joins it
};

}  // namespace aiocuda
