// The cuda backend: the driver API opened at run time, host-function completions, and the
// backstop that fails pending waits after a context error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "queue.hpp"

namespace aiocuda::cuda {

using CUresult = int;

struct DriverInfo {
    bool available = false;
    std::string reason;  // why not, when not available
    std::string path;
    int version = 0;     // e.g. 13000
    int device_count = 0;
};

// Loads libcuda once (AIOCUDA_LIBCUDA names another file) and calls cuInit. Thread-safe.
const DriverInfo& load();

// "CUDA_ERROR_X: description" for a driver code.
std::string error_text(CUresult code);
std::string device_name(int ordinal);

// Each returns 0 or a CUresult; negative values are aiocuda's own errors, described by `why`.
enum : int { kNotLoaded = -1, kForked = -2, kNotPrimary = -3 };

// Loop thread, GIL released: arrange for `n` to complete when `stream`'s prior work is done.
CUresult submit(uintptr_t stream, Node* n, std::string* why);
// GIL released: `n` completes when event `ev` (of any stream, any framework) has completed: a
// pooled stream of device `device`'s primary context waits on it and runs the host function.
CUresult wait_event(uintptr_t ev, int device, Node* n, std::string* why);
// GIL released: `n` completes when all work queued on device `device` so far has finished
// (cuCtxSynchronize on a native per-device thread; may over-wait by design).
CUresult device_synchronize(int device, Node* n, std::string* why);
// GIL released: create an event (CU_EVENT_DISABLE_TIMING) in `stream`'s context and record it there.
CUresult event_record(uintptr_t stream, uintptr_t* ev, std::string* why);
CUresult event_query(uintptr_t ev);  // 0 done, 600 not ready, else an error
CUresult event_synchronize(uintptr_t ev);  // blocks: call without the GIL
void event_destroy(uintptr_t ev);

size_t pending();              // records waiting on a host function
void set_backstop_period_ms(int ms);
void after_fork_in_child();

}  // namespace aiocuda::cuda
