// ABI check: csrc/driver.hpp declares the CUDA driver API without any CUDA header, so nothing
// in the build ties it to the real one. This file is compiled (syntax only) by tests/test_abi.py
// together with cuda.h and cudaTypedefs.h, and fails to compile if any pointer type, constant
// or handle aiocuda uses differs from the header's. Which variant cuGetProcAddress returns for
// each entry's `ask` version is checked by the Python test, which parses cudaTypedefs.h.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <type_traits>

#include "driver.hpp"

namespace {

// same_abi<A, B>: A and B are passed and returned the same way. Exact type identity, except that
// cuda.h's enums (CUresult, CUstreamCaptureStatus, ...) may be an integral type of the same size
// in driver.hpp, as they are passed alike. Applied through pointers (cv-qualifiers must match)
// and function types (same arity, return and each parameter).
template <class A, class B>
struct same_abi;

// Evaluated lazily: sizeof must not be taken of void or an opaque handle struct.
template <class E, class I, bool = std::is_enum_v<E> && std::is_integral_v<I>>
struct enum_as_int : std::false_type {};
template <class E, class I>
struct enum_as_int<E, I, true> : std::bool_constant<sizeof(E) == sizeof(I)> {};

// Cases on cv-unqualified types.
template <class A, class B>
struct same_abi_unqual
    : std::bool_constant<std::is_same_v<A, B> || enum_as_int<A, B>::value ||
                         enum_as_int<B, A>::value> {};
template <class A, class B>
struct same_abi_unqual<A*, B*> : same_abi<A, B> {};

template <class... P>
struct list {};
template <class L1, class L2>
struct same_params : std::false_type {};  // different arity
template <>
struct same_params<list<>, list<>> : std::true_type {};
template <class A, class... As, class B, class... Bs>
struct same_params<list<A, As...>, list<B, Bs...>>
    : std::bool_constant<same_abi<A, B>::value && same_params<list<As...>, list<Bs...>>::value> {};

template <class R1, class... P1, class R2, class... P2>
struct same_abi_unqual<R1(P1...), R2(P2...)>
    : std::bool_constant<same_abi<R1, R2>::value &&
                         same_params<list<P1...>, list<P2...>>::value> {};

template <class A, class B>
struct same_abi
    : std::bool_constant<std::is_const_v<A> == std::is_const_v<B> &&
                         std::is_volatile_v<A> == std::is_volatile_v<B> &&
                         same_abi_unqual<std::remove_cv_t<A>, std::remove_cv_t<B>>::value> {};

// The trait itself: what it must accept and reject.
static_assert(same_abi<CUresult (*)(int*), int (*)(int*)>::value);
static_assert(!same_abi<const char**, char**>::value);
static_assert(!same_abi<int (*)(int), int (*)(int, int)>::value);
static_assert(!same_abi<int (*)(unsigned), int (*)(int)>::value);
static_assert(!same_abi<CUresult, long long>::value);

}  // namespace

// Names are only ever pasted (##) or stringified (#): cuda.h #defines many entry names (e.g.
// cuCtxPushCurrent -> cuCtxPushCurrent_v2), which a plain use would expand.
#define ABI_ASSERT(ours, theirs) \
    static_assert(same_abi<ours, theirs>::value, "ABI mismatch: " #ours " is not " #theirs)

// Every entry: its pointer type is cudaTypedefs.h's PFN_<name>_v<pfn>; cuGetProcAddress only
// returns the pfn variant when asked at a version >= pfn; entries every CUDA 12 driver must
// have are asked for at no later version than aiocuda's kApiVersion.
#define CHECK_ENTRY(name, pfn, ask, optional, ret, params)                                    \
    ABI_ASSERT(aiocuda::drv::PFN_##name, ::PFN_##name##_v##pfn);                              \
    static_assert((ask) >= (pfn), #name ": asked for at a version older than PFN_" #name      \
                                        "_v" #pfn);                                           \
    static_assert((optional) || (ask) <= aiocuda::drv::kApiVersion,                           \
                  #name ": not optional, but asked for at a version above kApiVersion");
AIOCUDA_DRIVER_ENTRIES(CHECK_ENTRY)

ABI_ASSERT(aiocuda::drv::PFN_cuGetProcAddress, ::PFN_cuGetProcAddress_v12000);

// Constants: same value as cuda.h's enumerator of the same name. tests/test_abi.py checks that
// this list names every constant driver.hpp declares.
#define CHECK_CONST(NAME)                                                                     \
    static_assert(static_cast<long long>(aiocuda::drv::NAME) == static_cast<long long>(::NAME), \
                  #NAME ": driver.hpp's value differs from cuda.h's")
CHECK_CONST(CUDA_SUCCESS);
CHECK_CONST(CUDA_ERROR_INVALID_VALUE);
CHECK_CONST(CUDA_ERROR_OUT_OF_MEMORY);
CHECK_CONST(CUDA_ERROR_NOT_INITIALIZED);
CHECK_CONST(CUDA_ERROR_INVALID_DEVICE);
CHECK_CONST(CUDA_ERROR_INVALID_CONTEXT);
CHECK_CONST(CUDA_ERROR_INVALID_HANDLE);
CHECK_CONST(CUDA_ERROR_NOT_FOUND);
CHECK_CONST(CUDA_ERROR_NOT_READY);
CHECK_CONST(CUDA_ERROR_CONTEXT_IS_DESTROYED);
CHECK_CONST(CUDA_ERROR_NOT_SUPPORTED);
CHECK_CONST(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
CHECK_CONST(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
CHECK_CONST(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT);
CHECK_CONST(CUDA_ERROR_CAPTURED_EVENT);
CHECK_CONST(CU_EVENT_BLOCKING_SYNC);
CHECK_CONST(CU_EVENT_DISABLE_TIMING);
CHECK_CONST(CU_STREAM_NON_BLOCKING);
CHECK_CONST(CU_CTX_SCHED_BLOCKING_SYNC);
CHECK_CONST(CU_STREAM_WRITE_VALUE_DEFAULT);
CHECK_CONST(CU_STREAM_CAPTURE_STATUS_NONE);
CHECK_CONST(CU_STREAM_CAPTURE_STATUS_ACTIVE);
CHECK_CONST(CU_STREAM_CAPTURE_STATUS_INVALIDATED);
CHECK_CONST(CU_STREAM_CAPTURE_MODE_GLOBAL);
CHECK_CONST(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
CHECK_CONST(CU_STREAM_CAPTURE_MODE_RELAXED);
CHECK_CONST(CU_GET_PROC_ADDRESS_DEFAULT);
CHECK_CONST(CU_GET_PROC_ADDRESS_SUCCESS);

static_assert(aiocuda::drv::kMemHostRegisterDeviceMap == CU_MEMHOSTREGISTER_DEVICEMAP);

// Handles: the very same pointer types, not merely compatible ones.
static_assert(std::is_same_v<aiocuda::drv::CUcontext, ::CUcontext>, "CUcontext");
static_assert(std::is_same_v<aiocuda::drv::CUstream, ::CUstream>, "CUstream");
static_assert(std::is_same_v<aiocuda::drv::CUevent, ::CUevent>, "CUevent");
static_assert(std::is_same_v<aiocuda::drv::CUgraph, ::CUgraph>, "CUgraph");
static_assert(std::is_same_v<aiocuda::drv::CUdeviceptr, ::CUdeviceptr>, "CUdeviceptr");

#ifdef AIOCUDA_ABI_SELFTEST_BREAK
// Negative control for tests/test_abi.py: a deliberately wrong pairing that must fail.
ABI_ASSERT(aiocuda::drv::PFN_cuEventRecord, ::PFN_cuEventQuery_v2000);
#endif
