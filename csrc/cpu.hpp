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

#include "queue.hpp"

namespace aiocuda {

// A CPU event: the generation last recorded (loop thread) and the generation reached (workers).
struct CpuEventState {
    std::mutex mu;
    std::condition_variable cv;
    uint64_t recorded = 0;
    uint64_t completed = 0;
    void reach(uint64_t gen);
    void wait_for(uint64_t gen);
    bool done();
    uint64_t last_recorded() {  // any thread
        std::lock_guard<std::mutex> g(mu);
        return recorded;
    }
};

class CpuStream {
public:
    CpuStream();
    ~CpuStream();  // closes: waits for work already submitted

    // Loop thread. Each returns an empty string or the reason it could not submit.
    std::string marker(Node* n);
    // Runs fn(*args, **kwargs) on the worker under the GIL; stores the outcome in outcomes[token].
    // The references are stolen. With n == nullptr (and outcomes == nullptr) nothing waits for
    // the call: an exception goes to sys.unraisablehook.
    std::string call(Node* n, PyObject* fn, PyObject* args, PyObject* kwargs, PyObject* outcomes);
    std::string record(const std::shared_ptr<CpuEventState>& ev, uint64_t gen);
    std::string wait_event(const std::shared_ptr<CpuEventState>& ev, uint64_t gen);
    std::string delay(double seconds);
    void close();  // idempotent; call without the GIL
    bool closed();

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
        bool sleeping = false;              // the worker waits on cv: a submit must notify
        bool closing = false;
        bool joined = false;
        uint64_t submitted = 0;
    };
    std::string enqueue(Item&& item);
    static void run(Shared& sh);
    static void run_call(Item& it);

    bool forked() const { return epoch_ != g_fork_epoch.load(std::memory_order_relaxed); }

    std::shared_ptr<Shared> sh_;
    uint32_t epoch_;
    std::unique_ptr<std::thread> worker_;  // let go of, never joined, in a forked child
};

}  // namespace aiocuda
