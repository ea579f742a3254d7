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
};

class CpuStream {
public:
    CpuStream();
    ~CpuStream();  // closes: waits for work already submitted

    // Loop thread. Each returns an empty string or the reason it could not submit.
    std::string marker(Node* n);
    // Runs fn(*args, **kwargs) on the worker under the GIL; stores the outcome in outcomes[token].
    // The references are stolen.
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
    std::string enqueue(Item&& item);
    void run();
    static void run_call(Item& it);

    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Item> items_;
    std::atomic<uint64_t> enqueued_{0};  // lets the idle worker spin without the lock
    bool sleeping_ = false;              // the worker waits on cv_: a submit must notify
    bool closing_ = false;
    bool joined_ = false;
    uint32_t epoch_;
    uint64_t submitted_ = 0;
    std::thread worker_;
};

}  // namespace aiocuda
