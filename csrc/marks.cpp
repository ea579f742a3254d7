// Marks and timelines: who holds a mark and when it is freed, completion in stream order.
#include "engine_impl.hpp"

namespace aiocuda::cuda {

void discard(Node* n) {
    Queue* q = n->queue;
    free_node(n);
    q->release();
}

bool let_go(std::unique_lock<std::mutex>& g, bool leave) {
    bool let = false;
    while (eng->finished && !eng->pushing) {
        Node* n = eng->finished;
        eng->finished = nullptr;
        eng->finished_tail = &eng->finished;
        eng->pushing = true;
        g.unlock();
        let = true;
        complete_all(n);
        spin_lock(g);
        eng->pushing = false;
        if (eng->held) eng->hold_cv.notify_all();
    }
    if (eng->wake_engine || !eng->wake_placers.empty()) {
        thread_local std::vector<Placer*> placers;
        bool engine = eng->wake_engine;
        eng->wake_engine = false;
        placers.swap(eng->wake_placers);
        for (Placer* p : placers) p->wake = false;
        g.unlock();
        let = true;
        if (engine) eng->cv.notify_one();
        for (Placer* p : placers) p->cv.notify_one();
        placers.clear();
        if (!leave) spin_lock(g);
        return true;
    }
    if (leave) g.unlock();
    return let;
}

// ---- marks and timelines (under eng->mu) -------------------------------------------------------

uint64_t slot_add(Mark* m) {
    uint32_t i;
    if (!eng->free_slots.empty()) {
        i = eng->free_slots.back();
        eng->free_slots.pop_back();
    } else {
        i = static_cast<uint32_t>(eng->slots.size());
        eng->slots.push_back(nullptr);
        eng->gens.push_back(1);
    }
    eng->slots[i] = m;
    return (static_cast<uint64_t>(eng->gens[i]) << 32) | i;
}

Mark* slot_get(uint64_t key) {
    uint32_t i = static_cast<uint32_t>(key);
    if (i >= eng->slots.size() || eng->gens[i] != static_cast<uint32_t>(key >> 32)) return nullptr;
    return eng->slots[i];
}

Mark* new_mark(Timeline* tl) {
    Mark* m = new Mark;
    m->tl = tl;
    ++tl->alive;
    m->owner = eng;
    m->key = slot_add(m);
    return m;
}

void unref(Mark* m) {
    if (--m->refs > 0) return;
    uint32_t i = static_cast<uint32_t>(m->key);
    eng->slots[i] = nullptr;
    if (++eng->gens[i] == 0) eng->gens[i] = 1;
    eng->free_slots.push_back(i);
    // Only an event of a live context goes back to the pool: a reset destroyed the others.
    Timeline* tl = m->tl;
    if (m->ev && m->owned && !tl->cs->retired) give_back(tl->cs, m->ev);
    delete m;
    if (--tl->alive == 0 && !tl->active) {
        if (tl->kind == Timeline::kForeign) delete tl;  // it lives as long as its one mark
        else park(tl);                                  // an Event held it past its last await
    }
}

void attach(Mark* m, Node* n) {
    n->next = nullptr;
    if (m->tail) m->tail->next = n; else m->head = n;
    m->tail = n;
    ++m->waiters;
    ++eng->pending;
}

void finish(Mark* m, CUresult status) {
    if (m->done) return;
    m->done = true;
    m->status = status;
    if (m->placed) --eng->marks;
    // Queued in the order marks finish, so that completions reach each queue in stream order
    // whichever thread learns of them (a host function and a query can race); pushed once the
    // lock is let go (let_go).
    if (m->head) {
        for (Node* n = m->head; n; n = n->next) n->status = status;
        *eng->finished_tail = m->head;
        eng->finished_tail = &m->tail->next;
    }
    eng->pending -= m->waiters;
    m->head = m->tail = nullptr;
    m->waiters = 0;
    if (eng->sync_waiters) eng->placed_cv.notify_all();
}

// Returns whether the engine had nothing to watch before.
bool activate(Timeline* tl) {
    if (tl->active) return false;
    tl->active = true;
    eng->active.push_back(tl);
    return eng->active.size() == 1;
}

// Hands `m` to the engine for a lane's host function. The mark stays in its timeline (and counts
// against kMarksInFlight, its event out of the pool) until that host function has run.
void watch(Mark* m) {
    ++m->refs;  // the watch's: the host function may run after the mark was finished
    m->watched = true;
    eng->to_watch.push_back(m);
    eng->kick = true;
    eng->poke.fetch_add(1, std::memory_order_release);
}

void unwatch(Mark* m) {
    m->watched = false;
    unref(m);
}


// `m` now stands at the end of `tl`'s work as event `ev`: watched from here on.
void placed(Timeline* tl, Mark* m, CUevent ev) {
    m->ev = ev;
    m->placed = true;
    ++eng->marks;
    if (tl->tail) tl->tail->next = m; else tl->head = m;
    tl->tail = m;
    if (!m->bell) ++tl->in_flight;  // a doorbell takes no await's room (kMarksInFlight)
    m->at = Clock::now();
    // Event marks: a lane's host function, unless polling (kFlag watches device waits this way).
    if (!m->flag && current_strategy() != Strategy::kPoll) watch(m);
    eng->placed_cv.notify_all();
}

// Pops passed marks off the front of `tl`; returns its lane once nothing is watched there.
void reap(Timeline* tl) {
    bool freed = false;
    while (Mark* m = tl->head) {
        if (!m->done && m->fail != CUDA_SUCCESS) {  // every earlier mark has ended: now it fails
            finish(m, m->fail);
            eng->placed_cv.notify_all();
        }
        // A finished mark leaves even while a lane still watches it (the watch holds a reference):
        // a lane that a held stream delays never holds up this timeline's later marks.
        if (!m->done) break;
        tl->head = m->next;
        if (!tl->head) tl->tail = nullptr;
        if (m->placed && !m->bell) --tl->in_flight;
        if (m->bell) tl->bell = false;
        unref(m);
        freed = true;
    }
    if (tl->lane && tl->watching == 0) {
        Lane* lane = tl->lane;
        tl->lane = nullptr;
        if (--lane->users == 0 && lane->dead) delete lane;
    }
    if (freed) want_placing(tl);
}

bool idle(Timeline* tl) { return !tl->head && !tl->open && !tl->placing_now() && !tl->lane; }

bool wanted(const Mark* m) {
    if (m->refs > 1) return true;  // an Event's: an unplaced or flag mark has no watch or query
    for (const Node* n = m->head; n; n = n->next)
        if (!n->queue->abandoned()) return true;
    return false;
}

// Every earlier mark of a timeline completes with a passed one: work on a stream is ordered.
void passed(Mark* m, CUresult status) {
    if (m->done) return;  // whoever finished it finished every earlier mark too
    Timeline* tl = m->tl;
    if (tl->kind != Timeline::kForeign)
        for (Mark* p = tl->head; p && p != m; p = p->next) finish(p, p->fail ? p->fail : status);
    finish(m, status);
}

void give_back(CtxState* cs, CUevent ev) {
    (cs->pool.size() < kPooledEvents ? cs->pool : cs->doomed).push_back(ev);
}

}  // namespace aiocuda::cuda
