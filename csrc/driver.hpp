// The CUDA driver API as aiocuda calls it: types, constants and entry points, declared here so
// that no CUDA header or toolkit is needed to build. tests/abi/check.cpp compiles this file
// together with cuda.h and cudaTypedefs.h and checks every line below against them.
#pragma once

#include <cstddef>
#include <cstdint>

// Opaque handle types: the same tags as cuda.h, so the two agree where both are seen.
struct CUctx_st;
struct CUstream_st;
struct CUevent_st;
struct CUgraph_st;

namespace aiocuda::drv {

using CUresult = int;  // cuda.h: enum cudaError_enum
using CUdevice = int;
using CUcontext = CUctx_st*;
using CUstream = CUstream_st*;
using CUevent = CUevent_st*;
using CUgraph = CUgraph_st*;
using CUdeviceptr = unsigned long long;  // cuda.h: CUdeviceptr_v2 on 64-bit hosts
using CUhostFn = void (*)(void*);
using CUstreamCaptureStatus = int;  // cuda.h: enum CUstreamCaptureStatus_enum
using CUstreamCaptureMode = int;    // cuda.h: enum CUstreamCaptureMode_enum
using CUprocQueryResult = int;      // cuda.h: enum CUdriverProcAddressQueryResult_enum

// Constants, each with its cuda.h name (checked against the header).
constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_INITIALIZED = 3;
constexpr CUresult CUDA_ERROR_INVALID_DEVICE = 101;
constexpr CUresult CUDA_ERROR_INVALID_CONTEXT = 201;
constexpr CUresult CUDA_ERROR_INVALID_HANDLE = 400;
constexpr CUresult CUDA_ERROR_NOT_FOUND = 500;
constexpr CUresult CUDA_ERROR_NOT_READY = 600;
constexpr CUresult CUDA_ERROR_CONTEXT_IS_DESTROYED = 709;
constexpr CUresult CUDA_ERROR_NOT_SUPPORTED = 801;
constexpr CUresult CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900;
constexpr CUresult CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901;
constexpr CUresult CUDA_ERROR_STREAM_CAPTURE_IMPLICIT = 906;
constexpr CUresult CUDA_ERROR_CAPTURED_EVENT = 907;
constexpr unsigned CU_EVENT_BLOCKING_SYNC = 0x1;
constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x2;
constexpr unsigned CU_STREAM_NON_BLOCKING = 0x1;
constexpr unsigned CU_CTX_SCHED_BLOCKING_SYNC = 0x4;
constexpr unsigned CU_STREAM_WRITE_VALUE_DEFAULT = 0x0;
// cuda.h #defines it, so it cannot carry its name here (checked all the same).
constexpr unsigned kMemHostRegisterDeviceMap = 0x2;  // CU_MEMHOSTREGISTER_DEVICEMAP
constexpr CUstreamCaptureStatus CU_STREAM_CAPTURE_STATUS_NONE = 0;
constexpr CUstreamCaptureStatus CU_STREAM_CAPTURE_STATUS_ACTIVE = 1;
constexpr CUstreamCaptureStatus CU_STREAM_CAPTURE_STATUS_INVALIDATED = 2;
constexpr CUstreamCaptureMode CU_STREAM_CAPTURE_MODE_GLOBAL = 0;
constexpr CUstreamCaptureMode CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1;
constexpr CUstreamCaptureMode CU_STREAM_CAPTURE_MODE_RELAXED = 2;
constexpr unsigned long long CU_GET_PROC_ADDRESS_DEFAULT = 0;
constexpr CUprocQueryResult CU_GET_PROC_ADDRESS_SUCCESS = 0;

// The version aiocuda asks cuGetProcAddress for: every entry below exists in a CUDA 12.0 driver
// with the prototype given, except those marked optional, asked for at their own version.
constexpr int kApiVersion = 12000;

// cuGetProcAddress_v2 (CUDA 12.0): exported as a plain symbol, the one entry found by dlsym.
// PFN_cuGetProcAddress_v12000.
using PFN_cuGetProcAddress = CUresult (*)(const char*, void**, int, uint64_t, CUprocQueryResult*);

// X(name, pfn, ask, optional, ret, params): `name` is what cuGetProcAddress is asked for at
// cudaVersion `ask`; the pointer it returns has the type cudaTypedefs.h calls PFN_<name>_v<pfn>.
#define AIOCUDA_DRIVER_ENTRIES(X)                                                                 \
    X(cuInit, 2000, 12000, false, CUresult, (unsigned))                                          \
    X(cuDriverGetVersion, 2020, 12000, false, CUresult, (int*))                                  \
    X(cuDeviceGetCount, 2000, 12000, false, CUresult, (int*))                                    \
    X(cuDeviceGet, 2000, 12000, false, CUresult, (CUdevice*, int))                               \
    X(cuDeviceGetName, 2000, 12000, false, CUresult, (char*, int, CUdevice))                     \
    X(cuDevicePrimaryCtxRetain, 7000, 12000, false, CUresult, (CUcontext*, CUdevice))            \
    X(cuDevicePrimaryCtxGetState, 7000, 12000, false, CUresult, (CUdevice, unsigned*, int*))     \
    X(cuCtxGetCurrent, 4000, 12000, false, CUresult, (CUcontext*))                               \
    X(cuCtxSetCurrent, 4000, 12000, false, CUresult, (CUcontext))                                \
    X(cuCtxPushCurrent, 4000, 12000, false, CUresult, (CUcontext))                               \
    X(cuCtxPopCurrent, 4000, 12000, false, CUresult, (CUcontext*))                               \
    X(cuCtxGetId, 12000, 12000, false, CUresult, (CUcontext, unsigned long long*))               \
    X(cuCtxGetDevice, 2000, 12000, false, CUresult, (CUdevice*))                                 \
    X(cuCtxSynchronize, 2000, 12000, false, CUresult, ())                                        \
    X(cuCtxRecordEvent, 12050, 12050, true, CUresult, (CUcontext, CUevent))                      \
    X(cuStreamGetCtx, 9020, 12000, false, CUresult, (CUstream, CUcontext*))                      \
    X(cuStreamIsCapturing, 10000, 12000, false, CUresult, (CUstream, CUstreamCaptureStatus*))    \
    X(cuStreamCreate, 2000, 12000, false, CUresult, (CUstream*, unsigned))                       \
    X(cuStreamWaitEvent, 3020, 12000, false, CUresult, (CUstream, CUevent, unsigned))            \
    X(cuLaunchHostFunc, 10000, 12000, false, CUresult, (CUstream, CUhostFn, void*))              \
    X(cuThreadExchangeStreamCaptureMode, 10010, 12000, false, CUresult, (CUstreamCaptureMode*))  \
    X(cuEventCreate, 2000, 12000, false, CUresult, (CUevent*, unsigned))                         \
    X(cuEventRecord, 2000, 12000, false, CUresult, (CUevent, CUstream))                          \
    X(cuEventQuery, 2000, 12000, false, CUresult, (CUevent))                                     \
    X(cuEventSynchronize, 2000, 12000, false, CUresult, (CUevent))                               \
    X(cuEventDestroy, 4000, 12000, false, CUresult, (CUevent))                                   \
    X(cuGetErrorName, 6000, 12000, false, CUresult, (CUresult, const char**))                    \
    X(cuGetErrorString, 6000, 12000, false, CUresult, (CUresult, const char**))                 \
    X(cuStreamQuery, 2000, 12000, false, CUresult, (CUstream))                                   \
    X(cuStreamGetId, 12000, 12000, false, CUresult, (CUstream, unsigned long long*))             \
    X(cuMemHostRegister, 6050, 12000, true, CUresult, (void*, size_t, unsigned))                 \
    X(cuMemHostGetDevicePointer, 3020, 12000, true, CUresult, (CUdeviceptr*, void*, unsigned))   \
    X(cuStreamWriteValue32, 11070, 12000, true, CUresult,                                        \
      (CUstream, CUdeviceptr, uint32_t, unsigned))

#define AIOCUDA_DRIVER_PFN(name, pfn, ask, optional, ret, params) using PFN_##name = ret(*) params;
AIOCUDA_DRIVER_ENTRIES(AIOCUDA_DRIVER_PFN)
#undef AIOCUDA_DRIVER_PFN

}  // namespace aiocuda::drv
