// aiocuda._core: a completion queue with an fd, submissions, and a bounded drain. Everything
// asyncio-shaped lives in Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pthread.h>

#include <memory>
#include <string>

#include "cpu.hpp"
#include "cuda.hpp"
#include "queue.hpp"

namespace py = pybind11;
using namespace aiocuda;

namespace {

constexpr size_t kMaxBatch = 65536;

// The loop's side of a Queue. Submissions report failure as token 0 plus last_error(), so no
// Python exception is raised from native code.
class PyQueue {
public:
    PyQueue() : q_(Queue::create()) {}
    ~PyQueue() { close(); }
    PyQueue(const PyQueue&) = delete;
    PyQueue& operator=(const PyQueue&) = delete;

    void close() {
        if (q_) q_->release();
        q_ = nullptr;
    }
    bool closed() const { return q_ == nullptr; }
    int fd() const { return live()->fd(); }
    bool stale() const { return q_ && q_->stale(); }

    uint64_t submit_cpu(CpuStream& s) {
        Node* n = new_node(live());
        return accept(n, s.marker(n));
    }
    uint64_t submit_call(CpuStream& s, py::object fn, py::tuple args, py::object kwargs,
                         py::dict outcomes) {
        Node* n = new_node(live());
        PyObject* kw = kwargs.is_none() ? nullptr : kwargs.release().ptr();
        return accept(n, s.call(n, fn.release().ptr(), args.release().ptr(), kw,
                                outcomes.release().ptr()));
    }
    uint64_t submit_cuda(uintptr_t stream) {
        Node* n = new_node(live());
        uint64_t token = n->token;
        std::string why;
        int r;
        {
            py::gil_scoped_release nogil;  // cuLaunchHostFunc can block on a running host function
            r = cuda::submit(stream, n, &why);  // frees n itself on failure
        }
        if (r == 0) return token;
        set_error(r, why.empty() ? cuda::error_text(r) : why);
        return 0;
    }

    // Pops up to max finished records: (ok tokens, [(token, status) for the rest], more).
    py::tuple drain(size_t max) {
        Queue* q = live();
        if (max == 0 || max > kMaxBatch) max = kMaxBatch;
        if (buf_.size() < max) buf_.resize(max);
        bool more = false;
        size_t k = q->drain(max, buf_.data(), &more);
        size_t n_ok = 0;
        for (size_t i = 0; i < k; ++i) n_ok += buf_[i]->status == kOk;
        py::list ok(n_ok);
        py::list other;
        size_t j = 0;
        for (size_t i = 0; i < k; ++i) {
            Node* n = buf_[i];
            if (n->status == kOk) {
                PyList_SET_ITEM(ok.ptr(), j++, PyLong_FromUnsignedLongLong(n->token));
            } else {
                other.append(py::make_tuple(n->token, n->status));
            }
            // The record's queue reference was dropped by its producer; only the memory is left.
            free_node(n);
        }
        return py::make_tuple(std::move(ok), std::move(other), more);
    }

    py::tuple last_error() const { return py::make_tuple(err_code_, err_text_); }

private:
    Queue* live() const {
        if (!q_) throw std::runtime_error("completion queue is closed");
        return q_;
    }
    uint64_t accept(Node* n, const std::string& err) {
        if (err.empty()) return n->token;
        Queue* q = n->queue;
        free_node(n);
        q->release();
        set_error(-100, err);
        return 0;
    }
    void set_error(int code, std::string text) {
        err_code_ = code;
        err_text_ = std::move(text);
    }

    Queue* q_;
    std::vector<Node*> buf_;
    int err_code_ = 0;
    std::string err_text_;
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

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "aiocuda's native core: completion queues, the cpu backend and the CUDA driver.";
    pthread_atfork(nullptr, nullptr, on_fork_child);

    m.attr("STATUS_OK") = static_cast<int>(kOk);
    m.attr("STATUS_CALL_RETURNED") = static_cast<int>(kCallReturned);
    m.attr("STATUS_CALL_RAISED") = static_cast<int>(kCallRaised);
    m.attr("ERROR_NOT_LOADED") = static_cast<int>(cuda::kNotLoaded);
    m.attr("ERROR_FORKED") = static_cast<int>(cuda::kForked);
    m.attr("ERROR_NOT_PRIMARY") = static_cast<int>(cuda::kNotPrimary);
    m.attr("ERROR_REFUSED") = -100;

    py::class_<CpuStream, std::unique_ptr<CpuStream, GilFreeDelete>>(m, "CpuStream")
        .def(py::init<>())
        .def("close", &CpuStream::close, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("closed", &CpuStream::closed)
        .def_property_readonly("submitted", &CpuStream::submitted)
        .def("delay", &CpuStream::delay)
        .def("record", [](CpuStream& s, PyCpuEvent& e) {
            return s.record(e.state, ++e.state->recorded);  // recorded: loop thread only
        })
        .def("wait_event", [](CpuStream& s, PyCpuEvent& e) {
            return s.wait_event(e.state, e.state->recorded);
        });

    py::class_<PyCpuEvent>(m, "CpuEvent")
        .def(py::init<>())
        .def("done", [](PyCpuEvent& e) { return e.state->done(); });

    py::class_<PyQueue>(m, "CompletionQueue")
        .def(py::init<>())
        .def_property_readonly("fd", &PyQueue::fd)
        .def_property_readonly("stale", &PyQueue::stale)
        .def_property_readonly("closed", &PyQueue::closed)
        .def("close", &PyQueue::close)
        .def("submit_cpu", &PyQueue::submit_cpu)
        .def("submit_call", &PyQueue::submit_call)
        .def("submit_cuda", &PyQueue::submit_cuda)
        .def("drain", &PyQueue::drain)
        .def("last_error", &PyQueue::last_error);

    m.def("live_records", [] { return g_live_nodes.load(); });
    m.def("cuda_info", [] {
        const cuda::DriverInfo* info;
        {
            py::gil_scoped_release nogil;  // the first call loads the driver and runs cuInit
            info = &cuda::load();
        }
        const cuda::DriverInfo& d = *info;
        py::dict out;
        out["available"] = d.available;
        out["reason"] = d.reason;
        out["path"] = d.path;
        out["version"] = d.version;
        out["device_count"] = d.device_count;
        return out;
    });
    m.def("cuda_device_name", &cuda::device_name);
    m.def("cuda_error_text", &cuda::error_text);
    m.def("cuda_pending", &cuda::pending);
    m.def("cuda_set_backstop_period_ms", &cuda::set_backstop_period_ms);
    m.def("cuda_event_record", [](uintptr_t stream) {
        uintptr_t ev = 0;
        std::string why;
        int r;
        {
            py::gil_scoped_release nogil;
            r = cuda::event_record(stream, &ev, &why);
        }
        if (r != 0 && why.empty()) why = cuda::error_text(r);
        return py::make_tuple(r, ev, why);
    });
    m.def("cuda_event_query", &cuda::event_query, py::call_guard<py::gil_scoped_release>());
    m.def("cuda_event_destroy", &cuda::event_destroy, py::call_guard<py::gil_scoped_release>());
}
