// The completion queue: many producers (CUDA host functions, CPU workers), one consumer (the loop).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace aiocuda {

// Completion status carried by a record: 0 ok, > 0 a CUresult, < 0 one of ours.
enum Status : int32_t {
    kOk = 0,
    kCallReturned = -1,  // CPU call: the return value waits in the outcomes dict
    kCallRaised = -2,    // CPU call: the exception waits in the outcomes dict
};

class Queue;

// One submission (32 bytes). Producers touch only `next` and `status` and push it to `queue`;
// nothing here is a Python object.
struct Node {
    Node* next;
    Queue* queue;  // holds a reference while the record is in flight
    uint64_t token;
    int32_t status;
};

// Live records, so tests can check that each is freed exactly once. Each thread counts on a
// counter of its own, with no atomic read-modify-write: one per record made on the loop thread
// (a full fence) stalled it on the record's own first stores, 10% of an await on the cpu backend.
int64_t live_nodes();
// In a forked child: the counters' lock may have been held by a thread that does not exist here.
void queue_after_fork_in_child();
// Bumped in a forked child: objects from an older epoch belong to the parent.
extern std::atomic<uint32_t> g_fork_epoch;

// Any thread: a record for `q` carrying `token`; takes a reference on `q` (Queue::make: the
// same on the queue's own thread, cheaper).
Node* new_node(Queue* q, uint64_t token);
void free_node(Node* n) noexcept;
// Any thread: hand a finished record to its queue and drop the queue reference it held.
void complete(Node* n, int32_t status) noexcept;
// Any thread: complete(n, n->status) for each record of the list `n` (linked through `next`,
// in the order they finished), one push per run of records of the same queue.
void complete_all(Node* n) noexcept;

class Queue {
public:
    // Owned by Python (one reference) plus one per submission in flight.
    static Queue* create();
    void retain() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }
    void release() noexcept;
    // The owner's thread only (the loop thread, holding the GIL): new_node(this, token), its
    // reference taken from a reserve the owner takes kReserve at a time.
    Node* make(uint64_t token);
    // The owner lets the queue go: its own reference and what is left of its reserve.
    void release_owner() noexcept;
    // The owner will read nothing more from it (its loop closed). Said before the owner lets go
    // of its awaits' stream objects, whose release may destroy their stream; the owner's
    // reference may go later (PyQueue::close).
    void mark_abandoned() noexcept { abandoned_.store(true, std::memory_order_release); }
    // Any thread: whether the owner will read nothing more. Nothing need be done for what lands
    // here any more: the engine puts no open mark or doorbell on a stream for such awaits alone
    // (their stream objects were let go with the loop, and may have destroyed their stream).
    bool abandoned() const noexcept { return abandoned_.load(std::memory_order_acquire); }

    // Any thread: link the record, wake the loop only on the empty -> non-empty edge.
    void push(Node* n) noexcept { push(n, n, 1); }
    // Any thread: link `k` records at once, `newest` ... `oldest` already linked through `next`.
    void push(Node* newest, Node* oldest, size_t k) noexcept;
    // Drops `k` references at once.
    void release(size_t k) noexcept;

    // Loop thread only.
    int fd() const noexcept { return rfd_; }
    // Makes the fd readable again, so that records left for another pass are drained at the
    // loop's next poll when the caller cannot schedule that pass itself.
    void rearm() noexcept { signal(); }
    // Pops up to `max` records in completion order into `out`; returns how many; `more` says
    // whether records are left for another pass.
    size_t drain(size_t max, Node** out, bool* more) noexcept;
    bool stale() const noexcept { return epoch_ != g_fork_epoch.load(std::memory_order_relaxed); }
    // Counters written by producers, for statistics and tests.
    uint64_t pushed() const noexcept { return pushed_.load(std::memory_order_relaxed); }
    uint64_t signals() const noexcept { return signals_.load(std::memory_order_relaxed); }

private:
    Queue(int rfd, int wfd);
    ~Queue();
    void signal() noexcept;
    void clear_signal() noexcept;

    // One cache line per writer: the producers' (a push), the loop's (taken at every await,
    // dropped by producers once per push) and the consumer's own.
    alignas(64) std::atomic<Node*> head_{nullptr};  // LIFO stack written by producers
    std::atomic<uint64_t> pushed_{0};
    std::atomic<uint64_t> signals_{0};
    int wfd_;  // == rfd_ for an eventfd
    alignas(64) std::atomic<int64_t> refs_{1};
    static constexpr int64_t kReserve = 1024;
    alignas(64) int64_t reserve_ = 0;  // owner-private: references taken for records to come
    Node* taken_ = nullptr;  // consumer-private: a taken stack, newest first, being reversed
    Node* rev_head_ = nullptr;  // its reversed part (oldest of those first) ...
    Node* rev_tail_ = nullptr;  // ... ending with the newest record taken
    size_t rev_len_ = 0;
    Node* backlog_head_ = nullptr;  // consumer-private, FIFO
    Node* backlog_tail_ = nullptr;
    size_t backlog_len_ = 0;
    uint32_t epoch_;
    int rfd_;
    std::atomic<bool> abandoned_{false};
};

}  // namespace aiocuda
