#include "loader.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

namespace aiocuda::cuda {

Api api;

namespace {

DriverInfo info;
std::once_flag load_once;
bool forked = false;

bool resolve(void* lib, std::string* why) {
    // cuGetProcAddress_v2 (CUDA 12.0) is the one symbol looked up by name: it hands out every
    // other entry point at the ABI version asked for, whatever the installed driver's version.
    auto get_proc = reinterpret_cast<drv::PFN_cuGetProcAddress>(dlsym(lib, "cuGetProcAddress_v2"));
    if (!get_proc) {
        *why = "the CUDA driver has no cuGetProcAddress_v2: it is older than CUDA 12.0, which "
               "aiocuda needs; update the NVIDIA driver";
        return false;
    }
    auto get = [&](const char* name, int ask, bool optional, void** slot) {
        drv::CUprocQueryResult status = 0;
        *slot = nullptr;
        if (get_proc(name, slot, ask, drv::CU_GET_PROC_ADDRESS_DEFAULT, &status) !=
                drv::CUDA_SUCCESS || status != drv::CU_GET_PROC_ADDRESS_SUCCESS)
            *slot = nullptr;
        if (*slot || optional) return true;
        *why = std::string("the CUDA driver has no ") + name + " (CUDA " +
               std::to_string(ask / 1000) + "." + std::to_string(ask % 1000 / 10) +
               "): update the NVIDIA driver";
        return false;
    };
#define AIOCUDA_RESOLVE(name, pfn, ask, optional, ret, params) \
    if (!get(#name, ask, optional, reinterpret_cast<void**>(&api.name))) return false;
    AIOCUDA_DRIVER_ENTRIES(AIOCUDA_RESOLVE)
#undef AIOCUDA_RESOLVE
    return true;
}

void do_load() {
    const char* env = std::getenv("AIOCUDA_LIBCUDA");
    info.path = (env && *env) ? env : "libcuda.so.1";
    void* lib = dlopen(info.path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char* e = dlerror();
        info.reason = "no CUDA driver: could not load " + info.path + " (" + (e ? e : "?") +
                      "); install the NVIDIA driver, or set AIOCUDA_LIBCUDA to libcuda's path";
        return;
    }
    if (!resolve(lib, &info.reason)) return;
    // dladdr gives the file actually loaded, which is what `info` should show.
    Dl_info dl{};
    if (dladdr(reinterpret_cast<void*>(api.cuInit), &dl) && dl.dli_fname) info.path = dl.dli_fname;
    api.cuDriverGetVersion(&info.version);
    if (CUresult r = api.cuInit(0); r != drv::CUDA_SUCCESS) {
        info.reason = "the CUDA driver failed to initialise: " + error_text(r);
        return;
    }
    api.cuDeviceGetCount(&info.device_count);
    if (info.device_count == 0) {
        info.reason = "the CUDA driver found no device";
        return;
    }
    info.available = true;
}

}  // namespace

const DriverInfo& load() {
    std::call_once(load_once, do_load);
    return info;
}

CUresult check_ready(std::string* why) {
    const DriverInfo& d = load();
    if (!d.available) {
        *why = d.reason;
        return kNotLoaded;
    }
    if (forked) {
        *why = "CUDA was initialised in the parent process before fork(), and the driver cannot be "
               "used in a forked child: start worker processes with multiprocessing's 'spawn' "
               "method";
        return kForked;
    }
    return drv::CUDA_SUCCESS;
}

void mark_forked() {
    if (info.available) forked = true;
}

std::string error_text(CUresult code) {
    if (code == kNoThread)
        return "aiocuda could not start a native thread (the system is out of threads or memory): "
               "nothing was waited for; free some and await again";
    const char* name = nullptr;
    const char* text = nullptr;
    if (api.cuGetErrorName) api.cuGetErrorName(code, &name);
    if (api.cuGetErrorString) api.cuGetErrorString(code, &text);
    std::string s = name ? name : "CUDA_ERROR_" + std::to_string(code);
    if (text) s += std::string(": ") + text;
    return s;
}

std::string device_name(int ordinal) {
    char buf[256] = {0};
    drv::CUdevice dev = 0;
    if (!load().available || api.cuDeviceGet(&dev, ordinal) != drv::CUDA_SUCCESS ||
        api.cuDeviceGetName(buf, sizeof buf - 1, dev) != drv::CUDA_SUCCESS)
        return "";
    return buf;
}

}  // namespace aiocuda::cuda
