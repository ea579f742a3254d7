// A CPU hint for spin-wait loops (also used by the test-only driver emulator).
#pragma once

namespace aiocuda {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

}  // namespace aiocuda
