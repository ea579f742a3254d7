// libcuda, opened at run time: no CUDA header or toolkit is needed to build, and the package
// imports on machines without a GPU. AIOCUDA_LIBCUDA names another file (the tests' emulator).
#pragma once

#include <string>

#include "driver.hpp"

namespace aiocuda::cuda {

using drv::CUresult;

// The entry points of driver.hpp, resolved with cuGetProcAddress at their declared versions.
struct Api {
#define AIOCUDA_API_SLOT(name, pfn, ask, optional, ret, params) drv::PFN_##name name = nullptr;
    AIOCUDA_DRIVER_ENTRIES(AIOCUDA_API_SLOT)
#undef AIOCUDA_API_SLOT
};
extern Api api;

struct DriverInfo {
    bool available = false;
    std::string reason;  // why not, when not available
    std::string path;
    int version = 0;     // e.g. 13000
    int device_count = 0;
};

// Loads libcuda once and calls cuInit. Thread-safe.
const DriverInfo& load();

// Negative codes are aiocuda's own refusals; the text in `why` says what to do.
enum : int { kNotLoaded = -1, kForked = -2, kNotPrimary = -3, kCapturing = -4, kNoContext = -5,
             kBadDevice = -6, kPerThread = -7, kTooMany = -8, kNoThread = -9,
             kUnwanted = -10 };  // the awaits' loops closed: never delivered, never shown

// 0 when the driver may be used from this process, else kNotLoaded or kForked with `why` set.
CUresult check_ready(std::string* why);
void mark_forked();  // in a forked child: the parent initialised the driver

// "CUDA_ERROR_X: description" for a driver code.
std::string error_text(CUresult code);
std::string device_name(int ordinal);

}  // namespace aiocuda::cuda
