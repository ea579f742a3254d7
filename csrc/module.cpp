// aiocuda._core: a completion queue with an fd, submissions, and a bounded drain.
//
// The hot path (submit a wait, resolve a batch) is native because it runs once per operation;
// everything else asyncio-shaped (loop states, errors, statistics) lives in Python and is reached
// through a few hooks installed at import.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cpu.hpp"
#include "engine.hpp"
#include "loader.hpp"
#include "queue.hpp"

namespace py = pybind11;
using namespace aiocuda;

namespace {

constexpr size_t kMaxBatch = 65536;
constexpr int kRefused = -100;  // a cpu-backend submission was refused (closed stream, fork)

// Interpreter exit, as the GIL guard below sees it: set by aiocuda's atexit hook (stop_waits).
std::atomic<bool> g_exiting{false};
std::atomic<unsigned long> g_exit_thread{0};  // the thread that runs the exit
std::atomic<int> g_regaining{0};  // threads past the check below, taking the GIL back
std::atomic<int> g_parked{0};     // threads stopped for good at exit (park_for_good)

// Stops the calling thread for good (at interpreter exit, where CPython would end it).
[[noreturn]] void park_for_good() {
    g_parked.fetch_add(1);
    for (;;) pause();  // no Python code runs here again, and the process is ending
}

// The GIL let go for a blocking call, as py::gil_scoped_release does, with one difference. A
// daemon thread that takes the GIL back while the interpreter finalizes is ended there by
// pthread_exit() (Python 3.10-3.13, PyEval_RestoreThread), which unwinds the thread's stack:
// out of a noexcept destructor that calls std::terminate (a daemon thread in
// Event.synchronize() at exit aborted the process), and pybind11's frames above would swallow
// it. Such a thread is stopped here instead, for good, as Python 3.14 stops it itself.
// Finalization begins with no hook of its own, and a thread waiting for the GIL when it begins
// is ended, so the line is drawn earlier: aiocuda's atexit hook (after the non-daemon threads
// have been joined) sets g_exiting and lets the GIL go until every thread already past the
// check holds it again; from then on, a daemon thread whose native wait ends stays there.
struct NoGil {
    PyThreadState* ts = PyEval_SaveThread();
    NoGil() = default;
    NoGil(const NoGil&) = delete;
    NoGil& operator=(const NoGil&) = delete;
    ~NoGil() {
        g_regaining.fetch_add(1);  // seq_cst, against stop_waits' store then load
        if (g_exiting.load() && PyThread_get_thread_ident() != g_exit_thread.load()) {
            g_regaining.fetch_sub(1);
            park_for_good();
        }
        PyEval_RestoreThread(ts);
        g_regaining.fetch_sub(1);
    }
};

// A bound function that runs Python code (a loop's create_future, the callbacks set_result
// schedules, a __del__) is another place where a daemon thread meets interpreter exit: when that
// code lets the GIL go (the eval loop's switch interval), CPython 3.10-3.13 ends the thread with
// pthread_exit() as it takes the GIL back, and glibc unwinds the stack with a forced unwind.
// pybind11's dispatcher catches everything (`catch (...)`) and lets the forced unwind through
// only under libstdc++ (abi::__forced_unwind); the wheels link libc++, whose `catch (...)` ends
// it without a rethrow, and glibc aborts the process ("FATAL: exception not rethrown"). Such a
// function's body runs through this, and the thread stops here for good, as in NoGil, in every
// build (the same at exit whichever C++ library the build has). Every C++ exception of ours and
// of pybind11's is a std::exception: what else is caught is a foreign exception, and glibc's
// forced unwind is the only one that reaches this code.
template <typename F>
decltype(auto) exit_safe(F&& body) {
    try {
        return body();
    } catch (std::exception&) {
        throw;
    } catch (...) {
        park_for_good();  // without the GIL: the thread was denied it
    }
}

py::object steal_or_throw(PyObject* o) {  // a new reference, or nullptr with an error set
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(o);
}

void reset_exit() {  // at import (an embedder may initialize Python again) and in a forked child
    g_exiting.store(false);
    g_regaining.store(0);
    g_parked.store(0);
}

// aiocuda's atexit hook, with the GIL: see NoGil. Waits at most timeout_s for the threads
// already taking the GIL back (they get it while this waits without it).
void stop_waits(double timeout_s) {
    if (PyInterpreterState_Get() != PyInterpreterState_Main()) return;  // not the process's exit
    g_exit_thread.store(PyThread_get_thread_ident());
    g_exiting.store(true);
    PyThreadState* ts = PyEval_SaveThread();
    auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    while (g_regaining.load() != 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    PyEval_RestoreThread(ts);
}

// Python callables installed by aiocuda._api (see install_hooks).
struct Hooks {
    PyObject* get_running_loop = nullptr;  // asyncio._get_running_loop
    PyObject* state_for = nullptr;         // loop -> LoopState (with .queue)
    PyObject* cuda_handle = nullptr;       // stream-like -> (handle, device or -1), or raises
    PyObject* refused = nullptr;           // (code, text) -> exception instance
    PyObject* no_loop = nullptr;           // (what) -> exception instance
    PyObject* other_loop = nullptr;        // () -> a trio run's loop adapter, or None
    PyObject* nested_trio = nullptr;       // () -> a trio run's adapter beside asyncio's, or None
    PyObject* invalid_state = nullptr;     // asyncio.InvalidStateError
    PyObject* s_create_future = nullptr;
    PyObject* s_set_result = nullptr;
    PyObject* s_set_exception = nullptr;
    PyObject* s_queue = nullptr;
} hooks;

PyObject* raise_from(PyObject* exc) {  // steals exc; always returns nullptr
    if (!exc) return nullptr;
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
    Py_DECREF(exc);
    return nullptr;
}

const char* const kLostEventText =
    "the event was recorded in the parent process before fork() and its work had not finished: "
    "that work does not run in this process, so the event never completes here. Record events "
    "on streams made in this process";

// A wait by a stream's own worker for that stream's later work (the worker runs in order).
const char* const kSelfWaitText =
    "a function running on a CpuStream waited for work submitted to that stream after it (an "
    "event recorded there, or synchronize()): the stream runs in order, so it would wait "
    "for itself forever. Wait in the coroutine that submitted the function instead";

const char* const kSelfSubmitText =
    "a function running on a CpuStream submitted a call to that same stream: the stream runs in "
    "order, so the call would run only after the function returns, and a loop the function runs "
    "ends before that. Submit it to another stream, or return and submit it from the caller";

PyObject* raise_refused(int code, const std::string& text) {
    PyObject* msg = PyUnicode_FromStringAndSize(text.data(), static_cast<Py_ssize_t>(text.size()));
    if (!msg) return nullptr;
    return raise_from(PyObject_CallFunction(hooks.refused, "iN", code, msg));
}

PyTypeObject* cpu_stream_type = nullptr;  // CpuStreamBase

// How long a closing queue waits for a placement on its streams that is under way: one held in
// an enqueue on a full stream for longer goes on after the close (troubleshooting.md).
std::atomic<int> g_settle_ms{2000};  // (tests: _core.set_close_settle_ms)

// Bumped whenever a queue closes, so that no thread's cached (loop -> queue) is used after.
std::atomic<uint64_t> g_queue_epoch{1};

// The loop's side of a Queue: the futures waiting on it, by token, and the drain. Loop thread
// only (it holds the GIL); producers never see this object.
class PyQueue {
public:
    PyQueue() : q_(Queue::create()) {}
    // Collected with futures still held, their release may run Python code (a __del__, a
    // weakref callback), and with it the forced unwind of a daemon thread met by interpreter
    // exit (see exit_safe): a destructor cannot let it through (noexcept: std::terminate).
    // close() itself throws no C++ exception.
    ~PyQueue() {
        try {
            close(true);
        } catch (...) {
            park_for_good();
        }
    }
    PyQueue(const PyQueue&) = delete;
    PyQueue& operator=(const PyQueue&) = delete;

    // `dropped`: the loop let go of this queue's reader without close(), as uvloop does while it
    // closes: it drops the reader's callback, then unregisters the fd (epoll_ctl), all under the
    // GIL. The fd must outlive that, even if a producer holds the last native reference, so this
    // reference goes at the main thread's next pending call, which needs the GIL back.
    // `fail` (may be null): an exception for the futures still pending, which a trio run's
    // remaining tasks could still await; else they are dropped.
    void close(bool dropped = false, PyObject* fail = nullptr) {
        Queue* q = q_;
        if (!q) return;
        q_ = nullptr;  // closed from here on: the wait below lets the GIL go, and a second close
                       // (another thread's) then returns at once (found by review: it crashed)
        g_queue_epoch.fetch_add(1, std::memory_order_relaxed);
        // Before the stream objects go (a CuPy stream destroys its handle when collected): from
        // here on the engine puts nothing more on a stream for these awaits alone.
        q->mark_abandoned();
        // And a placement that found them waiting a moment ago may be touching the stream now
        // (microseconds; an enqueue on a full stream blocks in the driver until it has room).
        // With nothing pending here, no placement was for these awaits.
        if (pending_ != 0) {
            uint64_t before = cuda::touches_begun();
            if (!cuda::settle_touches(before, std::chrono::milliseconds(0))) {
                NoGil nogil;
                cuda::settle_touches(before, std::chrono::milliseconds(g_settle_ms.load()));
            }
        }
        std::vector<PyObject*> failed;
        for (Slot& s : slots_) {  // their loop is gone: nobody will await them
            if (fail && s.fut) failed.push_back(Py_NewRef(s.fut));
            Py_CLEAR(s.fut);
            Py_CLEAR(s.keep);
        }
        pending_ = 0;
        clear_outcomes();
        if (!dropped || Py_AddPendingCall(release_queue, q) != 0)
            q->release_owner();  // records in flight keep the native queue until they land
        g_queue_epoch.fetch_add(1, std::memory_order_relaxed);  // (a cache made meanwhile)
        for (PyObject* fut : failed) {  // closed first: their callbacks may start new waits
            fail_future(fut, fail);
            Py_DECREF(fut);
        }
    }
    static void fail_future(PyObject* fut, PyObject* exc) {
        PyObject* done = PyObject_CallMethod(fut, "done", nullptr);
        if (done == Py_False) {
            PyObject* r = PyObject_CallMethod(fut, "set_exception", "O", exc);
            Py_XDECREF(r);
        }
        Py_XDECREF(done);
        PyErr_Clear();
    }
    static int release_queue(void* q) {
        static_cast<Queue*>(q)->release_owner();
        return 0;
    }
    bool closed() const { return q_ == nullptr; }

    // In a forked child: fail every waiting future with `exc` (if `resolve`) and forget the
    // parent's native queue without touching it.
    void abandon(py::handle exc, bool resolve) {
        g_queue_epoch.fetch_add(1, std::memory_order_relaxed);
        for (Slot& s : slots_) {
            if (!s.fut) continue;
            if (resolve) fail_future(s.fut, exc.ptr());
            Py_CLEAR(s.fut);
            Py_CLEAR(s.keep);
        }
        pending_ = 0;
        clear_outcomes();
        q_ = nullptr;  // leaked on purpose: it is the parent's
    }
    int fd() const { return live()->fd(); }
    bool stale() const { return q_ && q_->stale(); }
    size_t pending() const { return pending_; }
    uint64_t pushed() const { return live()->pushed(); }
    uint64_t signals() const { return live()->signals(); }

    // Returns a new future that completes when the waited-for work is done, or nullptr with a
    // Python error set. `cpu` or `handle` names the stream; `keep` (may be null) stays referenced
    // until the wait ends (a stream object whose handle the driver must not see destroyed).
    enum Kind { kStream = 0, kEvent = 1, kDevice = 2, kRecord = 3, kCpuExit = 4 };

    // kEvent: `handle` is a CUevent of device `device`; kDevice: all work on `device`; kRecord:
    // as kStream, and `*mark` gets the mark for an aiocuda.Event; kCpuExit: closes the CpuStream
    // `cpu` and completes once its worker has run everything and exited.
    PyObject* wait(PyObject* loop, CpuStream* cpu, uintptr_t handle, int kind = kStream,
                   int device = -1, PyObject* keep = nullptr, cuda::Mark** mark = nullptr) {
        if (!q_) return raise_refused(kRefused, "the completion queue of this loop is closed");
        if (cpu && cpu->on_worker()) return raise_refused(kRefused, kSelfWaitText);
        PyObject* fut = PyObject_CallMethodNoArgs(loop, hooks.s_create_future);
        if (!fut) return nullptr;
        uint64_t token = put(fut, keep);
        Node* n = q_->make(token);
        int code;
        std::string why;
        if (cpu) {
            why = kind == kCpuExit ? cpu->close_notify(n) : cpu->marker(n);
            code = why.empty() ? 0 : kRefused;
            if (code) discard(n);
        } else {
            // Every driver call with the GIL let go, the queries too: a Python host function
            // (numba-cuda's async_done, CuPy's callbacks) runs holding the driver's lock and waits
            // for the GIL, so a driver call made holding the GIL can deadlock against it
            // (numba-cuda issue 317; cuda-python PR 2280: "the library never holds the GIL while
            // entering the driver").
            Py_BEGIN_ALLOW_THREADS
            try {
                switch (kind) {  // each frees n itself on failure
                    case kEvent: code = cuda::wait_event(handle, device, n, &why); break;
                    case kDevice: code = cuda::wait_device(device, n, &why); break;
                    case kRecord: code = cuda::record(handle, device, n, mark, &why); break;
                    default: code = cuda::wait_stream(handle, device, n, &why);
                }
            } catch (std::exception& e) {  // no memory or no thread: say so with the GIL back
                code = kRefused;
                why = std::string("aiocuda could not start the wait: ") + e.what();
            }
            Py_END_ALLOW_THREADS
            if (code && why.empty()) why = cuda::error_text(code);
        }
        if (code) {
            Py_XDECREF(take(token));
            Py_DECREF(fut);
            return raise_refused(code, why);
        }
        return fut;
    }

    py::object submit_call(CpuStream& s, py::handle loop, py::object fn, py::tuple args,
                           py::object kwargs) {
        live();
        if (s.on_worker()) {
            raise_refused(kRefused, kSelfSubmitText);
            throw py::error_already_set();
        }
        py::object fut = py::reinterpret_steal<py::object>(
            PyObject_CallMethodNoArgs(loop.ptr(), hooks.s_create_future));
        if (!fut) throw py::error_already_set();
        uint64_t token = put(fut.ptr());
        Node* n = q_->make(token);
        PyObject* kw = kwargs.is_none() ? nullptr : kwargs.release().ptr();
        std::string why = s.call(n, fn.release().ptr(), args.release().ptr(), kw,
                                 py::object(outcomes_).release().ptr());
        if (!why.empty()) {
            discard(n);
            Py_XDECREF(take(token));
            raise_refused(kRefused, why);
            throw py::error_already_set();
        }
        return fut;
    }

    // Resolves up to `max` finished records, in the order they finished, whatever their kind:
    // a stream's completions reach their futures in stream order. Nothing a future or an
    // outcome does stops the pass half way. Returns (count, more); with more, the fd is set
    // again.
    py::tuple drain(size_t max) {
        Queue* q = live();
        if (max == 0 || max > kMaxBatch) max = kMaxBatch;
        if (buf_.size() < max) buf_.resize(max);
        bool more = false;
        size_t k = q->drain(max, buf_.data(), &more);
        Raised interrupt;  // a KeyboardInterrupt or SystemExit met on the way, raised at the end
        for (size_t i = 0; i < k; ++i) {
            Node* n = buf_[i];
            uint64_t token = n->token;
            int32_t status = n->status;
            free_node(n);  // its producer already dropped the queue reference
            PyObject* fut = take(token);
            PyObject* outcome = nullptr;  // a cpu call's return value or exception
            if (status == kCallReturned || status == kCallRaised) {
                PyObject* key = PyLong_FromUnsignedLongLong(token);
                if (key) {
                    outcome = PyDict_GetItemWithError(outcomes_.ptr(), key);  // borrowed
                    Py_XINCREF(outcome);
                    if (outcome) PyDict_DelItem(outcomes_.ptr(), key);
                    Py_DECREF(key);
                }
                PyErr_Clear();  // no memory for the key: the waiter still completes (None)
            }
            if (fut) resolve(fut, status, outcome, &interrupt);  // no fut: refused after the fact
            Py_XDECREF(outcome);
            Py_XDECREF(fut);
        }
        // Records left: the fd wakes the loop for them at its next iteration. Set here, not by
        // the caller: a Ctrl-C lands in whatever Python code runs next, and a pass that the
        // caller meant to schedule after this call returned was never scheduled (the awaits
        // left hung for good, found by review).
        if (more && q_) q_->rearm();
        if (interrupt.type) {
            // Raised once every record taken from the queue is delivered (nobody else would
            // deliver them).
            PyErr_Restore(interrupt.type, interrupt.value, interrupt.tb);
            throw py::error_already_set();
        }
        return py::make_tuple(k, more);
    }

    void clear_outcomes() { PyDict_Clear(outcomes_.ptr()); }

    // The garbage collector's view (tp_traverse, tp_clear): the futures pending here refer to
    // their loop, whose reader refers to the LoopState that holds this queue. A loop dropped
    // without close() while an await is pending is such a cycle, which the collector could not
    // see through: the loop, its file descriptors and the futures were never freed.
    int traverse(visitproc visit, void* arg) const {
        for (const Slot& s : slots_) {
            Py_VISIT(s.fut);
            Py_VISIT(s.keep);
        }
        Py_VISIT(outcomes_.ptr());
        return 0;
    }

private:
    struct Raised { PyObject* type = nullptr; PyObject* value = nullptr; PyObject* tb = nullptr; };

    // If the error set is a KeyboardInterrupt or SystemExit (not an Exception), moves it to
    // `*out` (the first one; a later one is dropped) and returns true.
    static bool take_interrupt(Raised* out) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) return false;
        if (out->type) {
            PyErr_Clear();
        } else {
            PyErr_Fetch(&out->type, &out->value, &out->tb);
        }
        return true;
    }

    // Settles `fut` from a record's status. Never raises: what cannot be delivered as asked is
    // delivered as a RuntimeError, and what cannot be delivered at all is reported unraisable.
    // A KeyboardInterrupt or SystemExit raised meanwhile goes to `*interrupt`: Ctrl-C's handler
    // runs in whatever Python code runs, here the loop's call_soon that an asyncio future's
    // set_result calls, and it is the loop's to raise, not this future's failure to report (it
    // was swallowed as unraisable). That future is settled all the same, and asyncio's drops
    // its done callbacks when call_soon fails: its waiter is not woken, as anywhere in asyncio
    // where Ctrl-C lands in a call_soon.
    static void resolve(PyObject* fut, int32_t status, PyObject* outcome, Raised* interrupt) {
        PyObject* exc = nullptr;  // new reference, or null for a result
        if (status == kCallRaised && outcome) {
            if (PyErr_GivenExceptionMatches(outcome, PyExc_StopIteration)) {
                // A future cannot hold StopIteration (it would end the awaiting coroutine's
                // frame): asyncio turns it into a RuntimeError for the same reason.
                exc = PyObject_CallFunction(PyExc_RuntimeError, "s",
                                            "the function raised StopIteration");
                if (exc) {
                    Py_INCREF(outcome);
                    PyException_SetCause(exc, outcome);
                }
            } else {
                exc = Py_NewRef(outcome);
            }
        } else if (status != kOk && status != kCallReturned && status != kCallRaised) {
            exc = PyObject_CallFunction(hooks.refused, "is", static_cast<int>(status),
                                        cuda::error_text(status).c_str());
        }
        PyObject* r;
        if (exc) {
            r = PyObject_CallMethodOneArg(fut, hooks.s_set_exception, exc);
        } else if (PyErr_Occurred()) {
            r = nullptr;  // building the exception failed: that error is reported below
        } else {
            r = PyObject_CallMethodOneArg(fut, hooks.s_set_result,
                                          status == kCallReturned && outcome ? outcome : Py_None);
        }
        Py_XDECREF(exc);
        if (r) {
            Py_DECREF(r);
            return;
        }
        if (PyErr_ExceptionMatches(hooks.invalid_state)) {
            PyErr_Clear();  // cancelled while waiting: never resurrect it
            return;
        }
        // A future that refused its outcome: tell it so instead (one that an interrupt met
        // before it was settled too; one settled already refuses that in turn).
        if (!take_interrupt(interrupt)) PyErr_WriteUnraisable(fut);
        PyObject* again = PyObject_CallFunction(
            PyExc_RuntimeError, "s", "aiocuda could not deliver this operation's outcome");
        if (again) {
            r = PyObject_CallMethodOneArg(fut, hooks.s_set_exception, again);
            Py_XDECREF(r);
            Py_DECREF(again);
        }
        if (PyErr_Occurred() && !take_interrupt(interrupt)) PyErr_Clear();
    }

    struct Slot { PyObject* fut; PyObject* keep; uint32_t gen; };

    Queue* live() const {
        if (!q_) throw std::runtime_error("the completion queue of this loop is closed");
        return q_;
    }
    // Tokens are (generation << 32 | slot): a stale token never matches a reused slot.
    uint64_t put(PyObject* fut, PyObject* keep = nullptr) {
        uint32_t idx;
        if (!free_.empty()) {
            idx = free_.back();
            free_.pop_back();
        } else {
            idx = static_cast<uint32_t>(slots_.size());
            slots_.push_back(Slot{nullptr, nullptr, 1});
        }
        Py_INCREF(fut);
        Py_XINCREF(keep);
        slots_[idx].fut = fut;
        slots_[idx].keep = keep;
        ++pending_;
        return (static_cast<uint64_t>(slots_[idx].gen) << 32) | idx;
    }
    PyObject* take(uint64_t token) {  // the slot's reference, or nullptr
        uint32_t idx = static_cast<uint32_t>(token);
        if (idx >= slots_.size()) return nullptr;
        Slot& s = slots_[idx];
        if (s.gen != static_cast<uint32_t>(token >> 32) || !s.fut) return nullptr;
        PyObject* fut = s.fut;
        s.fut = nullptr;
        Py_CLEAR(s.keep);
        if (++s.gen == 0) s.gen = 1;
        free_.push_back(idx);
        --pending_;
        return fut;
    }
    static void discard(Node* n) {
        Queue* q = n->queue;
        free_node(n);
        q->release();
    }

    Queue* q_;
    std::vector<Slot> slots_;
    std::vector<uint32_t> free_;
    size_t pending_ = 0;
    std::vector<Node*> buf_;
    py::dict outcomes_;  // cpu calls: token -> return value or exception, until drained
};

// ---- aiocuda.synchronize: native, because it runs once per operation -----------------------
// The last (loop -> queue) this thread used. It owns nothing, so it keeps no loop alive: the
// queue is valid while the epoch is unchanged, since every queue bumps it when it closes, and a
// collected loop's queue is closed by its finalizer before another loop can take its address.
struct LoopCache {
    PyObject* loop = nullptr;  // compared by identity only
    PyQueue* queue = nullptr;
    uint64_t epoch = 0;
};
thread_local LoopCache t_cache;

PyQueue* queue_for(PyObject* loop) {
    LoopCache& c = t_cache;
    uint64_t epoch = g_queue_epoch.load(std::memory_order_relaxed);
    if (c.loop == loop && c.epoch == epoch) return c.queue;
    PyObject* st = PyObject_CallOneArg(hooks.state_for, loop);
    if (!st) return nullptr;
    PyObject* qo = PyObject_GetAttr(st, hooks.s_queue);
    Py_DECREF(st);  // the loop's state lives on in aiocuda._loop._states
    if (!qo) return nullptr;
    PyQueue* q = py::handle(qo).cast<PyQueue*>();
    Py_DECREF(qo);
    c.loop = loop;
    c.queue = q;
    c.epoch = epoch;
    return q;
}

pid_t g_pid = 0;  // this process's id, kept by on_fork_child: getpid() is a system call

#if PY_VERSION_HEX < 0x030C0000
// Python 3.10 and 3.11's asyncio._get_running_loop() makes a getpid() system call every time,
// a large share of an operation's cost. Their C accelerator keeps the running loop in a holder
// object in the thread-state dict (Modules/_asynciomodule.c, PyRunningLoopHolder: the loop and
// the pid that set it; a new holder whenever the running loop changes), so the loop is read
// from the holder directly, borrowing nothing across calls. The holder's type is learned from
// one that agrees with asyncio's own answer; anything else takes asyncio's way.
struct RunningLoopHolder {
    PyObject_HEAD
    PyObject* rl_loop;
    pid_t rl_pid;
};
PyObject* s_running_key = nullptr;
PyTypeObject* g_holder_type = nullptr;

PyObject* get_running_loop() {
    PyObject* d = PyThreadState_GetDict();
    PyObject* holder = d ? PyDict_GetItemWithError(d, s_running_key) : nullptr;  // borrowed
    if (holder && Py_TYPE(holder) == g_holder_type) {
        auto* h = reinterpret_cast<RunningLoopHolder*>(holder);
        if (h->rl_pid == g_pid) return Py_NewRef(h->rl_loop);
    }
    PyErr_Clear();
    PyObject* loop = PyObject_CallNoArgs(hooks.get_running_loop);
    if (loop && !g_holder_type) {
        holder = d ? PyDict_GetItemWithError(d, s_running_key) : nullptr;
        PyErr_Clear();
        if (holder && loop != Py_None &&
            std::strcmp(Py_TYPE(holder)->tp_name, "_RunningLoopHolder") == 0 &&
            reinterpret_cast<RunningLoopHolder*>(holder)->rl_loop == loop &&
            reinterpret_cast<RunningLoopHolder*>(holder)->rl_pid == g_pid)
            g_holder_type = Py_TYPE(holder);
    }
    return loop;
}
#else
PyObject* get_running_loop() { return PyObject_CallNoArgs(hooks.get_running_loop); }
#endif

// True if trio is running a tick on this thread: it says so in sniffio's thread-local name
// (trio imports sniffio). Costs a dict lookup where trio was never imported.
bool trio_ticking() {
    static PyObject* s_trio = PyUnicode_InternFromString("trio");
    static PyObject* s_name = PyUnicode_InternFromString("name");
    static PyObject* local = nullptr;  // sniffio.thread_local, once trio is imported
    if (!local) {
        PyObject* mods = PyImport_GetModuleDict();
        PyObject* sniffio = PyDict_GetItemWithError(mods, s_trio)  // borrowed
                                ? PyDict_GetItemString(mods, "sniffio")
                                : nullptr;
        local = sniffio ? PyObject_GetAttrString(sniffio, "thread_local") : nullptr;
        if (!local) {
            PyErr_Clear();
            return false;
        }
    }
    PyObject* name = PyObject_GetAttr(local, s_name);
    bool trio = name && PyUnicode_Check(name) && PyUnicode_Compare(name, s_trio) == 0;
    Py_XDECREF(name);
    PyErr_Clear();
    return trio;
}

PyObject* running_loop(const char* what) {
    PyObject* loop = get_running_loop();
    if (loop == Py_None) {  // no asyncio loop: maybe a trio run (aiocuda._trio), else an error
        Py_DECREF(loop);
        loop = PyObject_CallNoArgs(hooks.other_loop);
        if (loop != Py_None) return loop;
        Py_DECREF(loop);
        return raise_from(PyObject_CallFunction(hooks.no_loop, "s", what));
    }
    if (loop && trio_ticking()) {  // a trio run on an asyncio loop's thread, or the reverse
        PyObject* trio_loop = PyObject_CallNoArgs(hooks.nested_trio);
        if (!trio_loop || trio_loop != Py_None) {
            Py_DECREF(loop);
            return trio_loop;
        }
        Py_DECREF(trio_loop);
    }
    return loop;
}

constexpr int kMaxDevice = 1 << 20;  // far past any machine's device count; fits an int

// `device`: None, or an int ordinal (Python checked the type). Returns -1 for None.
int device_arg(PyObject* device) {
    if (!device || device == Py_None) return -1;
    if (PyBool_Check(device) || !PyLong_Check(device)) {
        PyErr_Format(PyExc_TypeError, "device must be an int CUDA device ordinal or None, got %s",
                     Py_TYPE(device)->tp_name);
        return -2;
    }
    int overflow = 0;
    long d = PyLong_AsLongAndOverflow(device, &overflow);
    if (d == -1 && PyErr_Occurred()) return -2;
    if (overflow || d < 0 || d > kMaxDevice) {
        PyErr_Format(PyExc_ValueError, "device must be a CUDA device ordinal in [0, %d], got %R",
                     kMaxDevice, device);
        return -2;
    }
    return static_cast<int>(d);
}

// Resolves a stream-like into a CpuStream or a (handle, device); a Python error on failure.
bool resolve_stream(PyObject* stream, int* device, CpuStream** cpu, uintptr_t* handle) {
    // Ask pybind11 only about CpuStreams: its caster is slow on other types, and even making
    // one looks the type up in pybind11's registry.
    if (PyObject_TypeCheck(stream, cpu_stream_type)) {
        py::detail::make_caster<CpuStream> caster;
        if (caster.load(stream, false)) {
            if (*device >= 0) {
                PyErr_SetString(PyExc_TypeError,
                                "device= names a CUDA device; a CpuStream has none");
                return false;
            }
            *cpu = &py::detail::cast_op<CpuStream&>(caster);
            return true;
        }
    }
    if (PyLong_CheckExact(stream)) {
        *handle = PyLong_AsUnsignedLongLong(stream);
        if (!(*handle == static_cast<uintptr_t>(-1) && PyErr_Occurred())) return true;
        PyErr_Clear();
    }
    // Stream protocols, torch streams (which carry their device) and the messages: Python's.
    PyObject* hd = PyObject_CallOneArg(hooks.cuda_handle, stream);
    if (!hd) return false;
    *handle = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(hd, 0));
    long own = PyLong_AsLong(PyTuple_GET_ITEM(hd, 1));
    Py_DECREF(hd);
    if (PyErr_Occurred()) return false;
    if (own >= 0 && *device >= 0 && own != *device) {
        PyErr_Format(PyExc_ValueError, "the stream is on CUDA device %ld, but device=%d", own,
                     *device);
        return false;
    }
    if (own >= 0) *device = static_cast<int>(own);
    return true;
}

PyObject* synchronize(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    PyObject* device_obj = nullptr;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs != 1 || nkw > 1 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "device"))) {
        PyErr_SetString(PyExc_TypeError,
                        "synchronize() takes one stream and an optional device= keyword");
        return nullptr;
    }
    if (nkw) device_obj = args[1];
    PyObject* stream = args[0];
    try {
        int device = device_arg(device_obj);
        if (device == -2) return nullptr;
        PyObject* loop = running_loop("aiocuda.synchronize()");
        if (!loop) return nullptr;
        PyObject* result = nullptr;
        if (PyQueue* q = queue_for(loop)) {
            CpuStream* cpu = nullptr;
            uintptr_t handle = 0;
            if (resolve_stream(stream, &device, &cpu, &handle))
                result = q->wait(loop, cpu, handle, PyQueue::kStream, device,
                                 PyLong_CheckExact(stream) ? nullptr : stream);
        }
        Py_DECREF(loop);
        return result;
    } catch (py::error_already_set& e) {
        e.restore();
        return nullptr;
    } catch (std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
        return nullptr;
    }
}

PyMethodDef fast_methods[] = {
    {"synchronize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(synchronize)),
     METH_FASTCALL | METH_KEYWORDS,
     "synchronize(stream, /, *, device=None)\n--\n\n"
     "Return a future done when all work enqueued on `stream` before the call has finished.\n\n"
     "`stream` is an aiocuda.CpuStream, an object with __cuda_stream__ (cuda.core, CuPy,\n"
     "numba), a torch.cuda.Stream, or a raw CUstream handle. Handles 0 and 1 name the\n"
     "legacy default stream of a device: `device` says which (else the current context's);\n"
     "2 (per-thread) is refused: aiocuda's threads cannot mark another thread's stream.\n"
     "The future fails with aiocuda.CudaError if the GPU work failed. Needs a running loop."},
    {nullptr, nullptr, 0, nullptr},
};

struct PyCpuEvent {
    std::shared_ptr<CpuEventState> state = std::make_shared<CpuEventState>();
};

void on_fork_child() {
    g_pid = getpid();
    reset_exit();  // a child forked by an atexit handler is not exiting (yet)
    g_fork_epoch.fetch_add(1, std::memory_order_relaxed);
    queue_after_fork_in_child();
    cpu_after_fork_in_child();
    cuda::after_fork_in_child();
}

PyObject* intern(const char* s) { return PyUnicode_InternFromString(s); }

// `call(&why)`, a driver-facing call made without the GIL: (code, why).
template <class Call>
py::tuple code_and_why(Call&& call) {
    std::string why;
    int r;
    {
        NoGil nogil;
        r = call(&why);
    }
    if (r != 0 && why.empty()) why = cuda::error_text(r);
    return py::make_tuple(r, why);
}

// A query or wait on the mark behind an aiocuda.Event.
template <int (*Fn)(cuda::Mark*, std::string*)>
py::tuple mark_call(uintptr_t m) {
    return code_and_why([m](std::string* why) { return Fn(reinterpret_cast<cuda::Mark*>(m), why); });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "aiocuda's native core: completion queues, the cpu backend and the CUDA driver.";
    g_pid = getpid();
    reset_exit();
    pthread_atfork(nullptr, nullptr, on_fork_child);
    hooks.s_create_future = intern("create_future");
    hooks.s_set_result = intern("set_result");
    hooks.s_set_exception = intern("set_exception");
    hooks.s_queue = intern("queue");
#if PY_VERSION_HEX < 0x030C0000
    s_running_key = intern("__asyncio_running_event_loop__");
#endif

    m.attr("STATUS_CALL_RETURNED") = static_cast<int>(kCallReturned);
    m.attr("STATUS_CALL_RAISED") = static_cast<int>(kCallRaised);

    // Collecting a stream closes it without waiting: its worker finishes in the background.
    py::class_<CpuStream>(m, "CpuStreamBase", py::dynamic_attr())
        .def(py::init<>())
        .def("_close", &CpuStream::close)
        .def("_wait_closed", &CpuStream::wait_closed, py::arg("timeout"),
             py::call_guard<NoGil>())
        .def_property_readonly("closed", &CpuStream::closed)
        .def_property_readonly("_pending", &CpuStream::pending)
        .def_property_readonly("_on_worker", &CpuStream::on_worker)
        .def("_delay", &CpuStream::delay)
        // A Python call on the worker that nothing awaits: the benchmarks' stand-in for a
        // Python-level stream callback (the design aiocuda replaces). Not public API.
        .def("_post", [](CpuStream& s, py::object fn) {
            return s.call(nullptr, fn.release().ptr(), PyTuple_New(0), nullptr, nullptr);
        })
        .def("_record", [](CpuStream& s, PyCpuEvent& e) {
            // The generation counts only once the stream took the record: a refused one (a
            // closed stream) must leave the event as it was, or it would never be done.
            CpuEventState& ev = *e.state;
            uint64_t gen;
            {
                std::lock_guard<std::mutex> g(ev.mu);
                gen = ev.recorded + 1;
            }
            std::string err = s.record(e.state, gen);
            if (err.empty()) {
                std::lock_guard<std::mutex> g(ev.mu);
                ev.recorded = gen;
                ev.epoch = g_fork_epoch.load(std::memory_order_relaxed);
                ev.recorder = s.worker();
            }
            return err;
        })
        .def("_wait_event", [](CpuStream& s, PyCpuEvent& e) {
            if (e.state->lost()) return std::string(kLostEventText);
            return s.wait_event(e.state, e.state->last_recorded());
        });

    cpu_stream_type = reinterpret_cast<PyTypeObject*>(m.attr("CpuStreamBase").ptr());

    py::class_<PyCpuEvent>(m, "CpuEvent")
        .def(py::init<>())
        .def("done", [](PyCpuEvent& e) { return e.state->done(); })
        .def("wait", [](PyCpuEvent& e) {
            if (e.state->lost()) {
                raise_refused(kRefused, kLostEventText);
                throw py::error_already_set();
            }
            uint64_t gen;
            bool self_wait;
            {
                CpuEventState& ev = *e.state;
                std::lock_guard<std::mutex> g(ev.mu);
                gen = ev.recorded;
                self_wait = ev.completed < gen && ev.recorder == std::this_thread::get_id();
            }
            if (self_wait) {
                raise_refused(kRefused, kSelfWaitText);
                throw py::error_already_set();
            }
            exit_safe([&] {  // the signal handlers run Python code
                for (;;) {  // in slices, as a blocking close(): a signal (Ctrl-C) is handled
                    bool reached;  // between two
                    {
                        NoGil nogil;
                        reached = e.state->wait_for(gen, 0.1);
                    }
                    if (reached) return;
                    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
                }
            });
        });

    py::class_<PyQueue>(m, "CompletionQueue", py::custom_type_setup([](PyHeapTypeObject* heap) {
        PyTypeObject* type = &heap->ht_type;
        type->tp_flags |= Py_TPFLAGS_HAVE_GC;
        type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) {
            Py_VISIT(Py_TYPE(self));  // a heap type's instances refer to it
            if (!py::detail::is_holder_constructed(self)) return 0;
            return py::cast<const PyQueue&>(py::handle(self)).traverse(visit, arg);
        };
        type->tp_clear = [](PyObject* self) {
            if (py::detail::is_holder_constructed(self))  // as when collected: close(dropped)
                exit_safe([&] { py::cast<PyQueue&>(py::handle(self)).close(true); });
            return 0;
        };
    }))
        .def(py::init<>())
        .def_property_readonly("fd", &PyQueue::fd)
        .def_property_readonly("stale", &PyQueue::stale)
        .def_property_readonly("closed", &PyQueue::closed)
        .def_property_readonly("pending", &PyQueue::pending)
        .def_property_readonly("pushed", &PyQueue::pushed)
        .def_property_readonly("signals", &PyQueue::signals)
        .def("close", [](PyQueue& q, py::handle fail) {  // futures' __del__: exit_safe
            exit_safe([&] { q.close(false, fail.is_none() ? nullptr : fail.ptr()); });
        }, py::arg("fail") = py::none())
        .def("abandon", &PyQueue::abandon)
        .def("wait", [](PyQueue& q, py::handle loop, py::object stream, int device) {
            py::detail::make_caster<CpuStream> caster;
            CpuStream* cpu = caster.load(stream, false)
                                 ? &py::detail::cast_op<CpuStream&>(caster) : nullptr;
            uintptr_t handle = cpu ? 0 : stream.cast<uintptr_t>();
            return exit_safe([&] {
                return steal_or_throw(q.wait(loop.ptr(), cpu, handle, PyQueue::kStream, device));
            });
        }, py::arg("loop"), py::arg("stream"), py::arg("device") = -1)
        .def("record_cuda", [](PyQueue& q, py::handle loop, uintptr_t handle, int device,
                               py::handle keep) {
            cuda::Mark* mark = nullptr;
            py::object fut = exit_safe([&] {
                return steal_or_throw(q.wait(loop.ptr(), nullptr, handle, PyQueue::kRecord,
                                             device, keep.ptr(), &mark));
            });
            return py::make_tuple(fut, reinterpret_cast<uintptr_t>(mark));
        })
        .def("wait_cuda_event", [](PyQueue& q, py::handle loop, uintptr_t event, int device,
                                   py::handle keep) {
            return exit_safe([&] {
                return steal_or_throw(
                    q.wait(loop.ptr(), nullptr, event, PyQueue::kEvent, device, keep.ptr()));
            });
        })
        .def("wait_device", [](PyQueue& q, py::handle loop, int device) {
            return exit_safe([&] {
                return steal_or_throw(q.wait(loop.ptr(), nullptr, 0, PyQueue::kDevice, device));
            });
        })
        .def("wait_closed", [](PyQueue& q, py::handle loop, CpuStream& s) {
            return exit_safe([&] {
                return steal_or_throw(q.wait(loop.ptr(), &s, 0, PyQueue::kCpuExit));
            });
        })
        .def("submit_call", [](PyQueue& q, CpuStream& s, py::handle loop, py::object fn,
                               py::tuple args, py::object kwargs) {
            return exit_safe([&] { return q.submit_call(s, loop, fn, args, kwargs); });
        })
        .def("drain", [](PyQueue& q, size_t max) {
            return exit_safe([&] { return q.drain(max); });  // set_result runs callbacks
        });

    m.def("install_hooks", [](py::object get_running_loop, py::object state_for,
                              py::object cuda_handle, py::object refused, py::object no_loop,
                              py::object invalid_state, py::object other_loop,
                              py::object nested_trio) {
        hooks.get_running_loop = get_running_loop.release().ptr();
        hooks.state_for = state_for.release().ptr();
        hooks.cuda_handle = cuda_handle.release().ptr();
        hooks.refused = refused.release().ptr();
        hooks.no_loop = no_loop.release().ptr();
        hooks.invalid_state = invalid_state.release().ptr();
        hooks.other_loop = other_loop.release().ptr();
        hooks.nested_trio = nested_trio.release().ptr();
    });
    if (PyModule_AddFunctions(m.ptr(), fast_methods) != 0) throw py::error_already_set();

    m.def("live_records", [] { return live_nodes(); });
    m.def("cpu_workers", &cpu_workers);
    m.def("cpu_fail_thread_starts", &cpu_fail_thread_starts);
    m.def("stop_waits", &stop_waits, py::arg("timeout"));
    m.def("parked_threads", [] { return g_parked.load(); });
    m.def("on_cpu_worker", &on_cpu_worker);
    m.def("cpu_wait_workers", &cpu_wait_workers, py::arg("timeout"),
          py::call_guard<NoGil>());
    m.def("cuda_info", [] {
        const cuda::DriverInfo* info;
        {
            NoGil nogil;  // the first call loads the driver and runs cuInit
            info = &cuda::load();
        }
        py::dict out;
        out["available"] = info->available;
        out["reason"] = info->reason;
        out["path"] = info->path;
        out["version"] = info->version;
        out["device_count"] = info->device_count;
        return out;
    });
    m.def("cuda_device_name", &cuda::device_name, py::call_guard<NoGil>());
    m.def("cuda_error_text", &cuda::error_text);
    m.def("cuda_stats", [] {
        cuda::Stats st = cuda::stats();
        py::dict out;
        out["pending"] = st.pending;
        out["marks"] = st.marks;
        out["events"] = st.events;
        out["lanes"] = st.lanes;
        out["threads"] = st.threads;
        out["flag_words"] = st.flag_words;
        out["timelines"] = st.timelines;
        out["parked"] = st.parked;
        out["handed_over"] = st.handed_over;
        out["bells"] = st.bells;
        out["naps"] = st.naps;
        return out;
    });
    m.def("cuda_pending", [] { return cuda::stats().pending; });
    m.def("cuda_set_backstop_period_ms", &cuda::set_backstop_period_ms);
    m.def("cuda_set_keep_idle_ms", &cuda::set_keep_idle_ms, py::call_guard<NoGil>());
    m.def("set_close_settle_ms", [](int ms) { g_settle_ms.store(std::max(0, ms)); });
    m.def("cuda_set_strategy", [](int s) { cuda::set_strategy(static_cast<cuda::Strategy>(s)); });
    m.def("cuda_strategy", [] { return static_cast<int>(cuda::strategy()); });
    m.def("cuda_hold", &cuda::hold, py::call_guard<NoGil>());
    m.def("cuda_fail_thread_starts", &cuda::fail_thread_starts);
    // Marks behind aiocuda.Event, passed to Python as integers (a reference each).
    m.def("cuda_mark_query", mark_call<cuda::mark_query>);
    m.def("cuda_mark_synchronize", mark_call<cuda::mark_synchronize>);
    m.def("cuda_check_stream", [](uintptr_t stream, int device) {
        return code_and_why(
            [=](std::string* why) { return cuda::check_stream(stream, device, why); });
    });
    m.def("cuda_mark_release", [](uintptr_t m) {
        cuda::mark_release(reinterpret_cast<cuda::Mark*>(m));
    }, py::call_guard<NoGil>());
}
