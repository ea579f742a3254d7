// How late a spinning thread sees a word another thread writes: the engine's kFlag spin (csrc/
// detection.cpp) as it was, reading the word once per 64 pauses, against reading it after every
// pause. A pause is 25 ns on an AMD EPYC VM and up to 140 cycles on Intel since Skylake.
//   g++ -O2 -pthread -o /tmp/spin_lag bench/native/spin_lag.cpp && /tmp/spin_lag 0 && /tmp/spin_lag 1
// x86 only (the pause instruction).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
using Clock = std::chrono::steady_clock;
std::atomic<uint32_t> word{0};
std::atomic<int64_t> written_at{0};
int64_t now_ns() { return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count(); }
int main(int argc, char** argv) {
    int mode = atoi(argv[1]);  // 0: old (64 pauses between reads), 1: new (read after every pause)
    int n = 2000;
    std::vector<double> lag;
    std::thread writer([&] {
        for (int i = 1; i <= n; ++i) {
            std::this_thread::sleep_for(std::chrono::microseconds(200 + (i * 37) % 300));
            written_at.store(now_ns(), std::memory_order_relaxed);
            word.store(i, std::memory_order_release);
        }
    });
    for (uint32_t i = 1; i <= (uint32_t)n; ++i) {
        if (mode == 0) {
            for (;;) {
                auto t = Clock::now(); (void)t;
                if (word.load(std::memory_order_acquire) >= i) break;
                for (int k = 0; k < 64; ++k) __builtin_ia32_pause();
            }
        } else {
            for (;;) {
                auto t = Clock::now(); (void)t;
                bool hit = false;
                for (int k = 0; k < 64 && !hit; ++k) {
                    hit = word.load(std::memory_order_acquire) >= i;
                    if (!hit) __builtin_ia32_pause();
                }
                if (hit) break;
            }
        }
        int64_t seen = now_ns();
        lag.push_back((seen - written_at.load(std::memory_order_relaxed)) / 1e3);
    }
    writer.join();
    std::sort(lag.begin(), lag.end());
    printf("%s: detection lag p50 %.2f us, p90 %.2f, p99 %.2f (n=%d)\n", mode ? "every pause " : "per 64 pauses",
           lag[lag.size() / 2], lag[lag.size() * 9 / 10], lag[lag.size() * 99 / 100], n);
}
