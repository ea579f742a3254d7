// aiocuda._core: a completion queue with an fd, submissions, and a bounded drain.
//
// The hot path (submit a wait, resolve a batch) is native because it runs once per operation;
// everything else asyncio-shaped (loop states, errors, statistics) lives in Python and is reached
// through a few hooks installed at import.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pthread.h>

#include <atomic>
#include <memory>
#include <string>
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

// Python callables installed by aiocuda._api (see install_hooks).
struct Hooks {
    PyObject* get_running_loop = nullptr;  // asyncio._get_running_loop
    PyObject* state_for = nullptr;         // loop -> LoopState (with .queue)
    PyObject* cuda_handle = nullptr;       // stream-like -> (handle, device or -1), or raises
    PyObject* refused = nullptr;           // (code, text) -> exception instance
    PyObject* no_loop = nullptr;           // (what) -> exception instance
    PyObject* invalid_state = nullptr;     // asyncio.InvalidStateError
    PyObject* s_create_future = nullptr;
    PyObject* s_set_result = nullptr;
    PyObject* s_queue = nullptr;
} hooks;

PyObject* raise_from(PyObject* exc) {  // steals exc; always returns nullptr
    if (!exc) return nullptr;
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
    Py_DECREF(exc);
    return nullptr;
}

PyObject* raise_refused(int code, const std::string& text) {
    PyObject* msg = PyUnicode_FromStringAndSize(text.data(), static_cast<Py_ssize_t>(text.size()));
    if (!msg) return nullptr;
    return raise_from(PyObject_CallFunction(hooks.refused, "iN", code, msg));
}

PyTypeObject* cpu_stream_type = nullptr;  // CpuStreamBase

// Bumped whenever a queue closes, so that no thread's cached (loop -> queue) is used after.
std::atomic<uint64_t> g_queue_epoch{1};

// The loop's side of a Queue: the futures waiting on it, by token, and the drain. Loop thread
// only (it holds the GIL); producers never see this object.
class PyQueue {
public:
    PyQueue() : q_(Queue::create()) {}
    ~PyQueue() { close(); }
    PyQueue(const PyQueue&) = delete;
    PyQueue& operator=(const PyQueue&) = delete;

    void close() {
        if (!q_) return;
        g_queue_epoch.fetch_add(1, std::memory_order_relaxed);
        for (Slot& s : slots_) {  // their loop is gone: nobody will await them
            Py_CLEAR(s.fut);
            Py_CLEAR(s.keep);
        }
        pending_ = 0;
        q_->release();  // records in flight keep the native queue until they land
        q_ = nullptr;
    }
    bool closed() const { return q_ == nullptr; }

    // In a forked child: fail every waiting future with `exc` (if `resolve`) and forget the
    // parent's native queue without touching it.
    void abandon(py::handle exc, bool resolve) {
        g_queue_epoch.fetch_add(1, std::memory_order_relaxed);
        for (Slot& s : slots_) {
            if (!s.fut) continue;
            if (resolve) {
                PyObject* done = PyObject_CallMethod(s.fut, "done", nullptr);
                if (done == Py_False) {
                    PyObject* r = PyObject_CallMethod(s.fut, "set_exception", "O", exc.ptr());
                    Py_XDECREF(r);
                }
                Py_XDECREF(done);
                PyErr_Clear();
            }
            Py_CLEAR(s.fut);
            Py_CLEAR(s.keep);
        }
        pending_ = 0;
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
    enum Kind { kStream = 0, kEvent = 1, kDevice = 2, kRecord = 3 };

    // kEvent: `handle` is a CUevent of device `device`; kDevice: all work on `device`; kRecord:
    // as kStream, and `*mark` gets the mark for an aiocuda.Event.
    PyObject* wait(PyObject* loop, CpuStream* cpu, uintptr_t handle, int kind = kStream,
                   int device = -1, PyObject* keep = nullptr, cuda::Mark** mark = nullptr) {
        if (!q_) return raise_refused(kRefused, "the completion queue of this loop is closed");
        PyObject* fut = PyObject_CallMethodNoArgs(loop, hooks.s_create_future);
        if (!fut) return nullptr;
        uint64_t token = put(fut, keep);
        Node* n = new_node(q_, token);
        int code;
        std::string why;
        if (cpu) {
            why = cpu->marker(n);
            code = why.empty() ? 0 : kRefused;
            if (code) discard(n);
        } else {
            Py_BEGIN_ALLOW_THREADS  // driver calls can block (a full stream): never with the GIL
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
                           py::object kwargs, py::dict outcomes) {
        live();
        py::object fut = py::reinterpret_steal<py::object>(
            PyObject_CallMethodNoArgs(loop.ptr(), hooks.s_create_future));
        if (!fut) throw py::error_already_set();
        uint64_t token = put(fut.ptr());
        Node* n = new_node(q_, token);
        PyObject* kw = kwargs.is_none() ? nullptr : kwargs.release().ptr();
        std::string why = s.call(n, fn.release().ptr(), args.release().ptr(), kw,
                                 outcomes.release().ptr());
        if (!why.empty()) {
            discard(n);
            Py_XDECREF(take(token));
            raise_refused(kRefused, why);
            throw py::error_already_set();
        }
        return fut;
    }

    // Resolves up to `max` finished records. Successful waits are resolved here; the rest come
    // back as [(future, status, token)] for Python. Returns (count, rest, more).
    py::tuple drain(size_t max) {
        Queue* q = live();
        if (max == 0 || max > kMaxBatch) max = kMaxBatch;
        if (buf_.size() < max) buf_.resize(max);
        bool more = false;
        size_t k = q->drain(max, buf_.data(), &more);
        py::list rest;
        for (size_t i = 0; i < k; ++i) {
            Node* n = buf_[i];
            uint64_t token = n->token;
            int32_t status = n->status;
            free_node(n);  // its producer already dropped the queue reference
            PyObject* fut = take(token);
            if (!fut) continue;  // its submission was refused after the fact
            if (status != kOk) {
                rest.append(py::make_tuple(py::reinterpret_steal<py::object>(fut), status, token));
                continue;
            }
            PyObject* r = PyObject_CallMethodOneArg(fut, hooks.s_set_result, Py_None);
            if (r) {
                Py_DECREF(r);
            } else if (PyErr_ExceptionMatches(hooks.invalid_state)) {
                PyErr_Clear();  // cancelled while waiting: never resurrect it
            } else {
                PyErr_WriteUnraisable(fut);
            }
            Py_DECREF(fut);
        }
        return py::make_tuple(k, std::move(rest), more);
    }

private:
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
};

// ---- aiocuda.synchronize: native, because it runs once per operation -----------------------
struct LoopCache {
    PyObject* loop = nullptr;   // borrowed: compared by identity only
    PyObject* state = nullptr;  // strong: keeps `queue` alive
    PyQueue* queue = nullptr;
    uint64_t epoch = 0;
};
thread_local LoopCache t_cache;

PyQueue* queue_for(PyObject* loop) {
    LoopCache& c = t_cache;
    if (c.loop == loop && c.epoch == g_queue_epoch.load(std::memory_order_relaxed)) return c.queue;
    uint64_t epoch = g_queue_epoch.load(std::memory_order_relaxed);
    PyObject* st = PyObject_CallOneArg(hooks.state_for, loop);
    if (!st) return nullptr;
    PyObject* qo = PyObject_GetAttr(st, hooks.s_queue);
    if (!qo) {
        Py_DECREF(st);
        return nullptr;
    }
    PyQueue* q = py::handle(qo).cast<PyQueue*>();
    Py_DECREF(qo);
    Py_XSETREF(c.state, st);
    c.loop = loop;
    c.queue = q;
    c.epoch = epoch;
    return q;
}

#if PY_VERSION_HEX < 0x030C0000
// Python 3.11's asyncio._get_running_loop() makes a getpid() system call every time, which is
// a large share of an operation's cost. asyncio keeps the running loop in a holder object in
// the thread-state dict and makes a new holder whenever the running loop changes, so while the
// holder is the one we saw, so is the loop. (3.12 keeps it in the thread state: no syscall.)
PyObject* s_running_key = nullptr;
thread_local PyObject* t_holder = nullptr;  // strong: its identity must not be reused
thread_local PyObject* t_loop = nullptr;    // borrowed: the holder references it
thread_local uint32_t t_fork_epoch = 0;

PyObject* get_running_loop() {
    PyObject* d = PyThreadState_GetDict();
    PyObject* holder = d ? PyDict_GetItemWithError(d, s_running_key) : nullptr;
    if (holder && holder == t_holder &&
        t_fork_epoch == g_fork_epoch.load(std::memory_order_relaxed)) {
        Py_INCREF(t_loop);
        return t_loop;
    }
    PyErr_Clear();
    PyObject* loop = PyObject_CallNoArgs(hooks.get_running_loop);
    if (loop && holder) {
        Py_INCREF(holder);
        Py_XSETREF(t_holder, holder);
        t_loop = loop;
        t_fork_epoch = g_fork_epoch.load(std::memory_order_relaxed);
    }
    return loop;
}
#else
PyObject* get_running_loop() { return PyObject_CallNoArgs(hooks.get_running_loop); }
#endif

PyObject* running_loop(const char* what) {
    PyObject* loop = get_running_loop();
    if (loop == Py_None) {
        Py_DECREF(loop);
        return raise_from(PyObject_CallFunction(hooks.no_loop, "s", what));
    }
    return loop;
}

// `device`: None, or an int ordinal (Python checked the type). Returns -1 for None.
int device_arg(PyObject* device) {
    if (!device || device == Py_None) return -1;
    if (PyBool_Check(device) || !PyLong_Check(device)) {
        PyErr_Format(PyExc_TypeError, "device must be an int CUDA device ordinal or None, got %s",
                     Py_TYPE(device)->tp_name);
        return -2;
    }
    long d = PyLong_AsLong(device);
    if (d == -1 && PyErr_Occurred()) return -2;
    if (d < 0 || d > 1 << 20) {
        PyErr_Format(PyExc_ValueError, "device must be >= 0, got %ld", d);
        return -2;
    }
    return static_cast<int>(d);
}

// Resolves a stream-like into a CpuStream or a (handle, device); a Python error on failure.
bool resolve_stream(PyObject* stream, int* device, CpuStream** cpu, uintptr_t* handle) {
    py::detail::make_caster<CpuStream> caster;
    // Ask pybind11 only about CpuStreams: its caster is slow on other types.
    if (PyObject_TypeCheck(stream, cpu_stream_type) && caster.load(stream, false)) {
        if (*device >= 0) {
            PyErr_SetString(PyExc_TypeError, "device= names a CUDA device; a CpuStream has none");
            return false;
        }
        *cpu = &py::detail::cast_op<CpuStream&>(caster);
        return true;
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
     "numba), a torch.cuda.Stream, or a raw CUstream handle. Handles 0, 1 and 2 name the\n"
     "default stream of a device: `device` says which (else the current context's).\n"
     "The future fails with aiocuda.CudaError if the GPU work failed. Needs a running loop."},
    {nullptr, nullptr, 0, nullptr},
};

struct PyCpuEvent {
    std::shared_ptr<CpuEventState> state = std::make_shared<CpuEventState>();
};

// Closing joins the worker, which may need the GIL to finish a call: never hold it meanwhile.
struct GilFreeDelete {
    void operator()(CpuStream* s) const {
        py::gil_scoped_release nogil;
        delete s;
    }
};

void on_fork_child() {
    g_fork_epoch.fetch_add(1, std::memory_order_relaxed);
    cuda::after_fork_in_child();
}

PyObject* intern(const char* s) { return PyUnicode_InternFromString(s); }

// A query or wait on the mark behind an aiocuda.Event, made without the GIL: (code, why).
template <int (*Fn)(cuda::Mark*, std::string*)>
py::tuple mark_call(uintptr_t m) {
    std::string why;
    int r;
    {
        py::gil_scoped_release nogil;
        r = Fn(reinterpret_cast<cuda::Mark*>(m), &why);
    }
    if (r != 0 && why.empty()) why = cuda::error_text(r);
    return py::make_tuple(r, why);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "aiocuda's native core: completion queues, the cpu backend and the CUDA driver.";
    pthread_atfork(nullptr, nullptr, on_fork_child);
    hooks.s_create_future = intern("create_future");
    hooks.s_set_result = intern("set_result");
    hooks.s_queue = intern("queue");
#if PY_VERSION_HEX < 0x030C0000
    s_running_key = intern("__asyncio_running_event_loop__");
#endif

    m.attr("STATUS_CALL_RETURNED") = static_cast<int>(kCallReturned);
    m.attr("STATUS_CALL_RAISED") = static_cast<int>(kCallRaised);

    py::class_<CpuStream, std::unique_ptr<CpuStream, GilFreeDelete>>(m, "CpuStreamBase",
                                                                     py::dynamic_attr())
        .def(py::init<>())
        .def("_close", &CpuStream::close, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("closed", &CpuStream::closed)
        .def("_delay", &CpuStream::delay)
        // A Python call on the worker that nothing awaits: the benchmarks' stand-in for a
        // Python-level stream callback (the design aiocuda replaces). Not public API.
        .def("_post", [](CpuStream& s, py::object fn) {
            return s.call(nullptr, fn.release().ptr(), PyTuple_New(0), nullptr, nullptr);
        })
        .def("_record", [](CpuStream& s, PyCpuEvent& e) {
            return s.record(e.state, ++e.state->recorded);  // `recorded`: loop thread only
        })
        .def("_wait_event", [](CpuStream& s, PyCpuEvent& e) {
            return s.wait_event(e.state, e.state->recorded);
        });

    cpu_stream_type = reinterpret_cast<PyTypeObject*>(m.attr("CpuStreamBase").ptr());

    py::class_<PyCpuEvent>(m, "CpuEvent")
        .def(py::init<>())
        .def("done", [](PyCpuEvent& e) { return e.state->done(); })
        .def("wait", [](PyCpuEvent& e) {
            uint64_t gen = e.state->recorded;
            py::gil_scoped_release nogil;
            e.state->wait_for(gen);
        });

    py::class_<PyQueue>(m, "CompletionQueue")
        .def(py::init<>())
        .def_property_readonly("fd", &PyQueue::fd)
        .def_property_readonly("stale", &PyQueue::stale)
        .def_property_readonly("closed", &PyQueue::closed)
        .def_property_readonly("pending", &PyQueue::pending)
        .def_property_readonly("pushed", &PyQueue::pushed)
        .def_property_readonly("signals", &PyQueue::signals)
        .def("close", &PyQueue::close)
        .def("abandon", &PyQueue::abandon)
        .def("wait", [](PyQueue& q, py::handle loop, py::object stream, int device) {
            py::detail::make_caster<CpuStream> caster;
            CpuStream* cpu = caster.load(stream, false)
                                 ? &py::detail::cast_op<CpuStream&>(caster) : nullptr;
            uintptr_t handle = cpu ? 0 : stream.cast<uintptr_t>();
            PyObject* fut = q.wait(loop.ptr(), cpu, handle, PyQueue::kStream, device);
            if (!fut) throw py::error_already_set();
            return py::reinterpret_steal<py::object>(fut);
        }, py::arg("loop"), py::arg("stream"), py::arg("device") = -1)
        .def("record_cuda", [](PyQueue& q, py::handle loop, uintptr_t handle, int device,
                               py::handle keep) {
            cuda::Mark* mark = nullptr;
            PyObject* fut = q.wait(loop.ptr(), nullptr, handle, PyQueue::kRecord, device,
                                   keep.ptr(), &mark);
            if (!fut) throw py::error_already_set();
            return py::make_tuple(py::reinterpret_steal<py::object>(fut),
                                  reinterpret_cast<uintptr_t>(mark));
        })
        .def("wait_cuda_event", [](PyQueue& q, py::handle loop, uintptr_t event, int device,
                                   py::handle keep) {
            PyObject* fut = q.wait(loop.ptr(), nullptr, event, PyQueue::kEvent, device,
                                   keep.ptr());
            if (!fut) throw py::error_already_set();
            return py::reinterpret_steal<py::object>(fut);
        })
        .def("wait_device", [](PyQueue& q, py::handle loop, int device) {
            PyObject* fut = q.wait(loop.ptr(), nullptr, 0, PyQueue::kDevice, device);
            if (!fut) throw py::error_already_set();
            return py::reinterpret_steal<py::object>(fut);
        })
        .def("submit_call", &PyQueue::submit_call)
        .def("drain", &PyQueue::drain);

    m.def("install_hooks", [](py::object get_running_loop, py::object state_for,
                              py::object cuda_handle, py::object refused, py::object no_loop,
                              py::object invalid_state) {
        hooks.get_running_loop = get_running_loop.release().ptr();
        hooks.state_for = state_for.release().ptr();
        hooks.cuda_handle = cuda_handle.release().ptr();
        hooks.refused = refused.release().ptr();
        hooks.no_loop = no_loop.release().ptr();
        hooks.invalid_state = invalid_state.release().ptr();
    });
    if (PyModule_AddFunctions(m.ptr(), fast_methods) != 0) throw py::error_already_set();

    m.def("live_records", [] { return g_live_nodes.load(); });
    m.def("cuda_info", [] {
        const cuda::DriverInfo* info;
        {
            py::gil_scoped_release nogil;  // the first call loads the driver and runs cuInit
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
    m.def("cuda_device_name", &cuda::device_name, py::call_guard<py::gil_scoped_release>());
    m.def("cuda_error_text", &cuda::error_text);
    m.def("cuda_stats", [] {
        cuda::Stats st = cuda::stats();
        py::dict out;
        out["pending"] = st.pending;
        out["marks"] = st.marks;
        out["events"] = st.events;
        out["lanes"] = st.lanes;
        out["threads"] = st.threads;
        return out;
    });
    m.def("cuda_pending", [] { return cuda::stats().pending; });
    m.def("cuda_set_backstop_period_ms", &cuda::set_backstop_period_ms);
    m.def("cuda_set_strategy", [](int s) { cuda::set_strategy(static_cast<cuda::Strategy>(s)); });
    m.def("cuda_strategy", [] { return static_cast<int>(cuda::strategy()); });
    m.def("cuda_hold", &cuda::hold, py::call_guard<py::gil_scoped_release>());
    // Marks behind aiocuda.Event, passed to Python as integers (a reference each).
    m.def("cuda_mark_query", mark_call<cuda::mark_query>);
    m.def("cuda_mark_synchronize", mark_call<cuda::mark_synchronize>);
    m.def("cuda_mark_release", [](uintptr_t m) {
        cuda::mark_release(reinterpret_cast<cuda::Mark*>(m));
    }, py::call_guard<py::gil_scoped_release>());
}
