// A CPU hint for spin-wait loops, and thread names (also used by the test-only driver emulator).
#pragma once

#include <atomic>
#include <mutex>

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

// Locks `m`, spinning a moment if it is contended before sleeping on it, for short critical
// sections on a thread that must not sleep for them: std::mutex sleeps at once (a futex wait),
// and the sleep and its wake-up cost microseconds, far more than the section (glibc's adaptive
// mutexes, PTHREAD_MUTEX_ADAPTIVE_NP, try 100 times in the same way). M: a mutex or a lock.
template <class M>
void spin_lock(M& m) {
    for (int i = 0; i < 100; ++i) {
        if (m.try_lock()) return;
        cpu_relax();
    }
    m.lock();
}

// Takes one of `left` (a test's count of thread starts still to fail, as the system would),
// if any is left: true means this start fails.
inline bool take_one(std::atomic<int>& left) noexcept {
    for (int n = left.load(); n > 0;)
        if (left.compare_exchange_weak(n, n - 1)) return true;
    return false;
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
