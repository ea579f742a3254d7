// A CPU hint for spin-wait loops, and thread names (also used by the test-only driver emulator).
#pragma once

#if defined(__linux__)
#include <pthread.h>
#endif

namespace aiocuda {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Names the calling thread (at most 15 characters), for top -H, py-spy, gdb and the tests'
// per-thread CPU checks.
inline void name_this_thread(const char* name) noexcept {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), name);
#else
    (void)name;
#endif
}

}  // namespace aiocuda
