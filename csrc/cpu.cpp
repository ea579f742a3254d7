#include "cpu.hpp"

#include <unistd.h>

#include <chrono>
#include <stdexcept>
#include <system_error>

#include "spin.hpp"

namespace aiocuda {

// An idle worker looks for new work this long (a CPU pause between looks) before it sleeps, so
// that a burst from the loop, an await every microsecond or so, does not pay a futex wake per
// submission. Short, because an idle transition that no submission ends pays all of it in CPU:
// a server's streams go idle after each request (4,096 pauses, the count this replaced, were
// 45 us on this project's Xeon VM; the serving benchmark's CPU per request at 4 connections went
// from 266 to 220 us). A loop that awaits its next kernel within the spin is caught either way.
constexpr auto kIdleSpin = std::chrono::microseconds(5);
constexpr uint64_t kMarkerRun = 256;  // markers completed in one push at most

void CpuEventState::reach(uint64_t gen) {
    {
        std::lock_guard<std::mutex> g(mu);
        if (gen > completed) completed = gen;
    }
    cv.notify_all();
}

void CpuEventState::wait_for(uint64_t gen) {
    std::unique_lock<std::mutex> g(mu);
    cv.wait(g, [&] { return completed >= gen; });
}

bool CpuEventState::done() {
    std::lock_guard<std::mutex> g(mu);
    return completed >= recorded;
}

namespace {

// The workers not exited yet, for the bounded wait at interpreter exit. Leaked on purpose: a
// worker may still be finishing while the process runs its static destructors.
struct Workers {
    std::mutex mu;
    std::condition_variable cv;
    int64_t live = 0;
};
Workers* g_workers = new Workers;
thread_local bool t_on_worker = false;

// Longest single wait, so that a huge timeout cannot overflow the clock.
constexpr double kMaxWaitS = 3600;

std::chrono::duration<double> wait_time(double seconds) {
    return std::chrono::duration<double>(seconds > 0 ? (seconds < kMaxWaitS ? seconds : kMaxWaitS)
                                                     : 0);
}

void worker_started() {
    std::lock_guard<std::mutex> g(g_workers->mu);
    ++g_workers->live;
}

void worker_exited() {
    Workers* w = g_workers;
    {
        std::lock_guard<std::mutex> g(w->mu);
        --w->live;
    }
    w->cv.notify_all();
}

}  // namespace

bool CpuEventState::wait_for(uint64_t gen, double timeout_s) {
    std::unique_lock<std::mutex> g(mu);
    return cv.wait_for(g, wait_time(timeout_s), [&] { return completed >= gen; });
}

bool on_cpu_worker() { return t_on_worker; }

int64_t cpu_workers() {
    std::lock_guard<std::mutex> g(g_workers->mu);
    return g_workers->live;
}

bool cpu_wait_workers(double timeout_s) {
    Workers* w = g_workers;
    std::unique_lock<std::mutex> g(w->mu);
    return w->cv.wait_for(g, wait_time(timeout_s), [w] { return w->live == 0; });
}

void cpu_after_fork_in_child() {
    // The parent's workers do not exist here, and a thread that held the lock may not either.
    g_workers = new Workers;  // the parent's copy is leaked, never touched
}

std::atomic<int> g_fail_starts{0};

void cpu_fail_thread_starts(int n) { g_fail_starts = n > 0 ? n : 0; }

CpuStream::CpuStream()
    : sh_(std::make_shared<Shared>()), epoch_(g_fork_epoch.load(std::memory_order_relaxed)) {
    worker_started();
    std::thread t;
    try {
        if (take_one(g_fail_starts))
            throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
        t = std::thread([sh = sh_] {
            name_this_thread("aiocuda-cpu");
            t_on_worker = true;
            run(*sh);
            worker_exited();
        });
    } catch (const std::system_error& e) {
        worker_exited();
        throw std::runtime_error(std::string("aiocuda could not start the CpuStream's worker "
                                             "thread (the system is out of threads or memory: ") +
                                 e.what() + "): close streams you no longer use, or make fewer");
    } catch (...) {
        worker_exited();
        throw;
    }
    worker_id_ = t.get_id();
    // Detached at birth: closing never joins (that would block whichever thread closes, maybe
    // an event loop's); a close that must wait waits on `exited` instead.
    t.detach();
}

CpuStream::~CpuStream() { close(); }

uint64_t CpuStream::pending() const {
    if (forked()) return 0;
    uint64_t done = sh_->finished.load(std::memory_order_acquire);
    return sh_->enqueued.load(std::memory_order_acquire) - done;
}

bool CpuStream::closed() {
    if (forked()) return true;  // unusable here; its lock may be held by a thread not copied
    std::lock_guard<std::mutex> g(sh_->mu);
    return sh_->closing;
}

std::string CpuStream::enqueue(Item&& item) {
    if (forked())
        return "this CpuStream was created before fork(); its worker thread does not exist in the "
               "child process: create a new CpuStream in the child";
    Shared& sh = *sh_;
    bool wake;
    {
        std::unique_lock<std::mutex> g(sh.mu, std::defer_lock);
        spin_lock(g);  // the worker holds it a moment per batch: never sleep on it for that
        if (sh.closing) return "the CpuStream is closed: create a new one";
        sh.items.push_back(std::move(item));
        sh.enqueued.store(++sh.submitted, std::memory_order_release);
        wake = sh.sleeping;
    }
    if (wake) sh.cv.notify_one();  // a futex call only when the worker really sleeps
    return {};
}

std::string CpuStream::marker(Node* n) {
    Item it{Kind::Marker};
    it.node = n;
    return enqueue(std::move(it));
}

std::string CpuStream::call(Node* n, PyObject* fn, PyObject* args, PyObject* kwargs,
                            PyObject* outcomes) {
    Item it{Kind::Call};
    it.node = n;
    it.fn = fn;
    it.args = args;
    it.kwargs = kwargs;
    it.outcomes = outcomes;
    std::string err = enqueue(std::move(it));
    if (!err.empty()) {  // we hold the GIL here: give the references back
        Py_DECREF(fn);
        Py_DECREF(args);
        Py_XDECREF(kwargs);
        Py_XDECREF(outcomes);
    }
    return err;
}

std::string CpuStream::record(const std::shared_ptr<CpuEventState>& ev, uint64_t gen) {
    Item it{Kind::Record};
    it.ev = ev;
    it.gen = gen;
    return enqueue(std::move(it));
}

std::string CpuStream::wait_event(const std::shared_ptr<CpuEventState>& ev, uint64_t gen) {
    Item it{Kind::Wait};
    it.ev = ev;
    it.gen = gen;
    return enqueue(std::move(it));
}

std::string CpuStream::delay(double seconds) {
    Item it{Kind::Delay};
    it.seconds = seconds;
    return enqueue(std::move(it));
}

void CpuStream::close() {
    // A forked child's copy: its worker, and any thread that held its lock at the fork, do not
    // exist here. Touch neither.
    if (forked()) return;
    {
        std::lock_guard<std::mutex> g(sh_->mu);
        if (sh_->closing) return;
        sh_->closing = true;
    }
    sh_->cv.notify_one();  // an idle worker wakes up and exits
}

std::string CpuStream::close_notify(Node* n) {
    if (forked()) {  // nothing of it runs here
        complete(n, kOk);
        return {};
    }
    bool exited;
    {
        std::lock_guard<std::mutex> g(sh_->mu);
        sh_->closing = true;
        exited = sh_->exited;
        if (!exited) {
            try {
                sh_->on_exit.push_back(n);
            } catch (std::bad_alloc&) {
                return "out of memory";
            }
        }
    }
    sh_->cv.notify_one();
    if (exited) complete(n, kOk);
    return {};
}

bool CpuStream::wait_closed(double timeout_s) {
    if (forked() || std::this_thread::get_id() == worker_id_) return true;
    std::unique_lock<std::mutex> g(sh_->mu);
    return sh_->exit_cv.wait_for(g, wait_time(timeout_s), [this] { return sh_->exited; });
}

// A worker keeps one Python thread state from its first call to its exit. Made and deleted per
// call, each would take CPython's runtime lock without the GIL, and a fork() in another thread
// while a worker holds it hangs the child in PyOS_AfterFork_Child. (It also keeps a worker's
// threading.local values from one call to the next, as on any Python thread.)
thread_local bool t_keeps_tstate = false;

void keep_thread_state() {  // with the GIL, inside a call's PyGILState_Ensure
    if (t_keeps_tstate) return;
    PyGILState_Ensure();  // a count of its own: each call's Release no longer deletes the state
    t_keeps_tstate = true;
}

void drop_thread_state() {  // as the worker exits, without the GIL
    if (!t_keeps_tstate) return;
    t_keeps_tstate = false;
#if PY_VERSION_HEX >= 0x030D0000
    if (Py_IsFinalizing()) return;  // the interpreter is going away: leave the state to it
#else
    if (_Py_IsFinalizing()) return;
#endif
    PyGILState_STATE gs = PyGILState_Ensure();
    PyGILState_Release(PyGILState_LOCKED);  // keep_thread_state's count
    PyGILState_Release(gs);                 // the last: deletes the state, drops the GIL
}

void CpuStream::run_call(Item& it, std::atomic<uint64_t>& finished) {
    PyGILState_STATE gs = PyGILState_Ensure();
    keep_thread_state();
    uint32_t epoch = g_fork_epoch.load(std::memory_order_relaxed);
    PyObject* result = PyObject_Call(it.fn, it.args, it.kwargs);
    if (g_fork_epoch.load(std::memory_order_relaxed) != epoch) {
        // The function forked, and this is the child, back in a copy of the parent's worker:
        // it would run the parent's later work a second time and complete records into the
        // parent's queue, then sleep for ever. The child ends here, as one whose thread returns
        // does (a child of a fork from a thread should end itself: os._exit() or an exec()).
        PyObject* out = PySys_GetObject("stdout");  // borrowed; what the child printed
        PyObject* r = out ? PyObject_CallMethod(out, "flush", nullptr) : nullptr;
        Py_XDECREF(r);
        PyErr_Clear();
        _exit(0);
    }
    if (result && PyCoro_CheckExact(result)) {
        // An async function (or one that calls one) ran: the coroutine it made would never run.
        PyObject* r = PyObject_CallMethod(result, "close", nullptr);  // no "never awaited"
        Py_XDECREF(r);
        PyErr_Clear();
        Py_DECREF(result);
        result = nullptr;
        PyErr_Format(PyExc_TypeError,
                     "%R returned a coroutine: the stream runs plain functions. Await the "
                     "coroutine on the loop instead (`await fn(...)`), not through submit() or "
                     "gpu_op()", it.fn);
    }
    if (!it.node) {  // posted: nobody waits for the outcome
        if (!result) PyErr_WriteUnraisable(it.fn);
        Py_XDECREF(result);
        Py_DECREF(it.fn);
        Py_DECREF(it.args);
        PyGILState_Release(gs);
        finished.fetch_add(1, std::memory_order_release);  // counted as any call (pending())
        return;
    }
    int32_t status = kCallReturned;
    if (!result) {
        status = kCallRaised;
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb) PyException_SetTraceback(value, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        result = value;
    }
    PyObject* key = PyLong_FromUnsignedLongLong(it.node->token);
    if (!key || PyDict_SetItem(it.outcomes, key, result) != 0) {
        PyErr_WriteUnraisable(it.fn);  // out of memory: the waiter still completes, with None
        status = kCallReturned;
    }
    Py_XDECREF(key);
    Py_XDECREF(result);
    Py_DECREF(it.fn);
    Py_DECREF(it.args);
    Py_XDECREF(it.kwargs);
    Py_DECREF(it.outcomes);
    PyGILState_Release(gs);
    finished.fetch_add(1, std::memory_order_release);  // before the waiter can see it done
    complete(it.node, status);  // after the GIL is dropped: the completion path never needs it
}

void CpuStream::run(Shared& sh) {
    uint64_t taken = 0;
    std::deque<Item> batch;
    for (;;) {
        // Idle: spin a few microseconds before sleeping (kIdleSpin). Bounded, so an idle stream
        // costs nothing; the clock is read every 16 pauses.
        auto spin_until = std::chrono::steady_clock::now() + kIdleSpin;
        for (unsigned i = 1; sh.enqueued.load(std::memory_order_acquire) == taken; ++i) {
            cpu_relax();
            if (i % 16 == 0 && std::chrono::steady_clock::now() >= spin_until) break;
        }
        {
            std::unique_lock<std::mutex> g(sh.mu);
            if (sh.items.empty() && !sh.closing) {
                sh.sleeping = true;
                sh.cv.wait(g, [&] { return sh.closing || !sh.items.empty(); });
                sh.sleeping = false;
            }
            if (sh.items.empty()) break;  // closing, and everything submitted has run
            batch.swap(sh.items);  // take everything at once: one lock per batch, not per item
            taken += batch.size();
        }
        // Markers in a row complete together, one push for the run (at most kMarkerRun): each
        // push is a handful of atomic operations on cache lines the loop thread uses too.
        Node* run = nullptr;
        Node** run_end = &run;
        uint64_t in_run = 0;
        auto complete_run = [&] {
            if (!in_run) return;
            *run_end = nullptr;
            // Counted as finished before their waiters can learn they are done.
            sh.finished.fetch_add(in_run, std::memory_order_release);
            complete_all(run);
            run = nullptr;
            run_end = &run;
            in_run = 0;
        };
        for (Item& it : batch) {
            if (it.kind == Kind::Marker) {
                it.node->status = kOk;
                *run_end = it.node;
                run_end = &it.node->next;
                if (++in_run == kMarkerRun) complete_run();
                continue;
            }
            complete_run();
            // Counted as finished before its waiter can learn it is done (pending() is 0 then).
            switch (it.kind) {
                case Kind::Marker: break;
                case Kind::Call: run_call(it, sh.finished); break;
                case Kind::Record:
                    sh.finished.fetch_add(1, std::memory_order_release);
                    it.ev->reach(it.gen);
                    break;
                case Kind::Wait:
                    it.ev->wait_for(it.gen);
                    sh.finished.fetch_add(1, std::memory_order_release);
                    break;
                case Kind::Delay:
                    std::this_thread::sleep_for(std::chrono::duration<double>(it.seconds));
                    sh.finished.fetch_add(1, std::memory_order_release);
                    break;
            }
        }
        complete_run();
        batch.clear();
    }
    drop_thread_state();
    std::vector<Node*> notify;
    {
        std::lock_guard<std::mutex> g(sh.mu);
        sh.exited = true;
        notify.swap(sh.on_exit);
    }
    sh.exit_cv.notify_all();
    for (Node* n : notify) complete(n, kOk);
}

}  // namespace aiocuda
