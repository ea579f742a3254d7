#include "queue.hpp"

#include <algorithm>
#include <initializer_list>
#include <mutex>
#include <vector>

#include <cerrno>
#include <new>
#include <stdexcept>
#include <system_error>
#include <fcntl.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif

namespace aiocuda {

std::atomic<uint32_t> g_fork_epoch{0};

namespace {

// Every thread's record count, and the sum of those of threads that have ended. Leaked: threads
// that outlive static destructors may still count.
std::mutex* g_counts_mu = new std::mutex;
std::vector<struct NodeCount*>* g_counts = new std::vector<NodeCount*>;
int64_t g_ended_count = 0;

struct NodeCount {
    std::atomic<int64_t> n{0};  // written by its own thread alone: a load and a store, no lock
    NodeCount() {
        std::lock_guard<std::mutex> g(*g_counts_mu);
        g_counts->push_back(this);
    }
    ~NodeCount() {
        std::lock_guard<std::mutex> g(*g_counts_mu);
        g_ended_count += n.load();
        g_counts->erase(std::find(g_counts->begin(), g_counts->end(), this));
    }
    void add(int64_t d) noexcept {
        n.store(n.load(std::memory_order_relaxed) + d, std::memory_order_relaxed);
    }
};
thread_local NodeCount t_count;

}  // namespace

void queue_after_fork_in_child() { g_counts_mu = new std::mutex; }  // the old one leaked

int64_t live_nodes() {
    std::lock_guard<std::mutex> g(*g_counts_mu);
    int64_t sum = g_ended_count;
    for (NodeCount* c : *g_counts) sum += c->n.load();
    return sum;
}

Node* new_node(Queue* q, uint64_t token) {
    Node* n = new Node{nullptr, q, token, kOk};
    q->retain();
    t_count.add(1);
    return n;
}

Node* Queue::make(uint64_t token) {
    Node* n = new Node{nullptr, this, token, kOk};
    if (reserve_ == 0) {
        refs_.fetch_add(kReserve, std::memory_order_relaxed);
        reserve_ = kReserve;
    }
    --reserve_;
    t_count.add(1);
    return n;
}

void Queue::release_owner() noexcept {
    mark_abandoned();
    int64_t k = 1 + reserve_;
    reserve_ = 0;
    release(static_cast<size_t>(k));
}

void free_node(Node* n) noexcept {
    t_count.add(-1);
    delete n;
}

void complete(Node* n, int32_t status) noexcept {
    Queue* q = n->queue;  // read before the push: the consumer may free `n` right after it
    n->status = status;
    q->push(n);
    q->release();
}

void complete_all(Node* n) noexcept {
    while (n) {
        Queue* q = n->queue;
        Node* oldest = n;
        Node* newest = nullptr;  // the run, relinked newest first (the queue's stack order)
        size_t k = 0;
        while (n && n->queue == q) {
            Node* next = n->next;
            n->next = newest;
            newest = n;
            n = next;
            ++k;
        }
        q->push(newest, oldest, k);
        q->release(k);
    }
}

Queue* Queue::create() {
#ifdef __linux__
    int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
    return new Queue(fd, fd);
#else
    int fds[2];
    if (::pipe(fds) != 0) throw std::system_error(errno, std::generic_category(), "pipe");
    for (int fd : fds) {
        ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
        ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    return new Queue(fds[0], fds[1]);
#endif
}

Queue::Queue(int rfd, int wfd)
    : wfd_(wfd), epoch_(g_fork_epoch.load(std::memory_order_relaxed)), rfd_(rfd) {}

Queue::~Queue() {
    // Only reached once no producer holds a reference, so nothing can push any more.
    Node* n = head_.exchange(nullptr, std::memory_order_acquire);
    while (n) { Node* next = n->next; free_node(n); n = next; }
    for (Node* list : {taken_, rev_head_, backlog_head_})
        for (n = list; n;) { Node* next = n->next; free_node(n); n = next; }
    ::close(rfd_);
    if (wfd_ != rfd_) ::close(wfd_);
}

void Queue::release() noexcept { release(1); }

void Queue::release(size_t k) noexcept {
    auto drop = static_cast<int64_t>(k);
    if (refs_.fetch_sub(drop, std::memory_order_acq_rel) == drop) delete this;
}

void Queue::push(Node* newest, Node* oldest, size_t k) noexcept {
    Node* old = head_.load(std::memory_order_relaxed);
    do {
        oldest->next = old;
    } while (!head_.compare_exchange_weak(old, newest, std::memory_order_release,
                                          std::memory_order_relaxed));
    pushed_.fetch_add(k, std::memory_order_relaxed);
    if (old == nullptr) signal();  // coalesced: only the push that made the stack non-empty
}

void Queue::signal() noexcept {
    signals_.fetch_add(1, std::memory_order_relaxed);
    // Enqueue and signal, ignore EAGAIN: a full counter or pipe already means "readable".
#ifdef __linux__
    uint64_t one = 1;
    ssize_t r;
    do { r = ::write(wfd_, &one, sizeof one); } while (r < 0 && errno == EINTR);
#else
    char one = 1;
    ssize_t r;
    do { r = ::write(wfd_, &one, 1); } while (r < 0 && errno == EINTR);
#endif
}

void Queue::clear_signal() noexcept {
    char buf[64];
    for (;;) {
        ssize_t r = ::read(rfd_, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0 || rfd_ == wfd_) return;  // one eventfd read resets its counter
    }
}

size_t Queue::drain(size_t max, Node** out, bool* more) noexcept {
    // A flood leaves a long stack: reversing it is a pointer chase through cold memory, so it is
    // done in bounded steps across passes (like the batches) instead of all in one pass.
    constexpr size_t kReverseStep = 8192;
    if (!taken_ && backlog_len_ < max) {
        // Clear the wake-up before taking the stack: a push after the exchange signals again.
        clear_signal();
        taken_ = head_.exchange(nullptr, std::memory_order_acquire);
        rev_tail_ = taken_;
    }
    for (size_t i = 0; taken_ && i < kReverseStep; ++i) {
        Node* next = taken_->next;
        taken_->next = rev_head_;
        rev_head_ = taken_;
        taken_ = next;
        ++rev_len_;
    }
    if (!taken_ && rev_head_) {  // fully reversed: it follows the older records in the backlog
        if (backlog_tail_) backlog_tail_->next = rev_head_; else backlog_head_ = rev_head_;
        backlog_tail_ = rev_tail_;
        backlog_len_ += rev_len_;
        rev_head_ = rev_tail_ = nullptr;
        rev_len_ = 0;
    }
    size_t k = 0;
    while (k < max && backlog_head_) {
        out[k++] = backlog_head_;
        backlog_head_ = backlog_head_->next;
    }
    if (!backlog_head_) backlog_tail_ = nullptr;
    backlog_len_ -= k;
    *more = backlog_len_ != 0 || taken_ != nullptr;
    return k;
}

}  // namespace aiocuda
