// The engine thread: learns that marks were passed (flag words, queries, host functions), and
// the backstop that finds sticky errors and resets.
#include "engine_impl.hpp"

#ifdef __linux__
#include <sys/prctl.h>
#endif

namespace aiocuda::cuda {

// ---- the engine thread -------------------------------------------------------------------------


bool is_capture_error(CUresult r) { return r >= 900 && r <= 908; }  // CUDA_ERROR_STREAM_CAPTURE_*

// ---- kFlag: reading the words ------------------------------------------------------------------

// When the engine thread should look at the words again: now (spin), at a time, or never (no flag
// mark is pending).
struct FlagPlan {
    bool pending = false;
    Clock::time_point next = Clock::time_point::max();
    // While a completion is due: the timelines whose words to spin on (and the number each
    // waits for), until spin_until; other timelines want a look at `later`.
    struct Due { Timeline* tl; const uint32_t* word; uint32_t seq; };
    std::vector<Due> due;
    Clock::time_point spin_until = Clock::time_point::max();
    Clock::time_point later = Clock::time_point::max();
};

// A timeline's history: flag mark `m` was passed after `seen` at the earliest (the last look
// that found it short). A moving average (a quarter of each new figure): a lopsided one (quick
// down, slow up) kept the estimate below most marks and the thread spinning through the
// difference: 30% of a core awaiting 1 ms kernels one by one on the emulator, 23% with this, and
// no later wake-ups (a doorbell covers an early end). A spin's last look counts as a look: taught
// the spin's start instead, the estimate slid early by the lead each mark until a mark ended
// past the spin, which a nap then found tens of microseconds late (13% of a core with it, and a
// wake-up p90 of 30-45 us against 60-65 on the emulator).
// And how far marks stray from it (the same average of the distance): work of varied lengths
// ends early as often as late, and a thread asleep until the average found an early end up to
// the spread late (mixed 0.2-0.9 ms kernels: 68 us at the p50 against the sleeping-loop floor's
// 20, found by review), so the spin starts that much earlier (read_flags()).
void learn(Timeline* tl, Mark* m, Clock::time_point seen) {
    int64_t took =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::max(seen, m->at) - m->at).count();
    int64_t off = took - tl->est_ns;
    tl->est_ns += off / 4;
    tl->spread_ns += (std::abs(off) - tl->spread_ns) / 4;
}

// Under eng->mu: completes every flag mark whose word its stream has written (plain loads, no
// driver call), learns how long marks take, and plans the next look. A word only grows (cyclic,
// as cuStreamWaitValue32 compares): a value that reached a mark's sequence number passed it.
const FlagPlan& read_flags(Clock::time_point now, bool* progress) {
    static thread_local FlagPlan plan;  // the engine thread's, reused: no allocation per look
    plan.pending = false;
    plan.next = plan.spin_until = plan.later = Clock::time_point::max();
    plan.due.clear();
    // A mark seen passed now passed after the timeline's previous look (a look before a nap, or
    // the spin's last one, microseconds before): that look's time is what it took at least.
    // Learning from it (not from now) keeps a late wake-up from teaching a later one.
    for (Timeline* tl : eng->active) {
        if (!tl->word || tl->cs->retired) continue;
        Clock::time_point prev = tl->looked;
        tl->looked = now;
        uint32_t v = __atomic_load_n(tl->word, __ATOMIC_ACQUIRE);
        Mark* upto = nullptr;
        Mark* oldest = nullptr;
        for (Mark* m = tl->head; m; m = m->next) {
            if (!m->flag || m->done) continue;
            if (static_cast<int32_t>(v - m->seq) >= 0) upto = m;
            else if (!oldest) oldest = m;
        }
        if (upto && tl->ringing) continue;  // place_bell() wakes this thread when it is done
        if (upto) {
            learn(tl, upto, prev);
            passed(upto, CUDA_SUCCESS);
            reap(tl);  // hands the open mark, if any, to its placer
            *progress = true;
        }
        if (!oldest) continue;
        plan.pending = true;
        auto due = oldest->at + std::chrono::nanoseconds(tl->est_ns);
        // The margin for an estimate that may be early: a 32nd of it, twice the spread when
        // more (at most all of it), or less with a doorbell placed, which tells of an early end
        // (and costs no CPU meanwhile).
        auto margin = std::chrono::nanoseconds(
            std::min(tl->est_ns, std::max(tl->est_ns / 32, 2 * tl->spread_ns)));
        if (tl->bell) margin = std::min<std::chrono::nanoseconds>(margin, kBellMargin);
        auto lead = kFlagLead + margin + std::chrono::nanoseconds(eng->oversleep_ns);
        Clock::time_point next;
        bool ring;
        if (now < due - lead) {  // sleep through most of it; a long sleep with a doorbell
            next = due - lead;
            ring = next - now >= kBellSleep;
        } else if (now < due + kFlagSpin) {  // due: spin
            next = now;
            ring = false;
            plan.due.push_back({tl, tl->word, oldest->seq});
            plan.spin_until = std::min(plan.spin_until, due + kFlagSpin);
        } else {  // late: nap, for longer the later it is; a doorbell once it is long overdue
            auto late = now - due;
            next = now + (tl->bell ? std::min<Clock::duration>(kBellMaxNap, late / 4)
                                   : std::min<Clock::duration>(kFlagMaxNap, late / 16));
            ring = late >= kBellLate;
        }
        if (ring && !tl->bell) want_bell(tl);
        plan.next = std::min(plan.next, next);
        if (next != now) plan.later = std::min(plan.later, next);
    }
    return plan;
}

// One pass of the engine's driver calls; returns whether anything completed or was placed.
bool pass(Strategy strat, bool backstop) {
    struct Watch { Mark* m; CUevent ev; Lane* lane; bool make_lane; CtxState* cs; };
    std::vector<Watch> watches;
    auto& tls = eng->tls;
    auto& ctxs = eng->pass_ctxs;
    tls.clear();
    ctxs.clear();
    bool progress = false;
    {
        Locked g;
        for (Mark* m : eng->seen) {  // marks host functions reported and left to this thread
            if (!m->tl->cs->retired) {
                Timeline* tl = m->tl;
                passed(m, CUDA_SUCCESS);
                reap(tl);
                progress = true;
            }
            unref(m);
        }
        eng->seen.clear();
        read_flags(Clock::now(), &progress);
        tls = eng->active;
        for (Timeline* tl : tls)
            if (!tl->cs->retired && std::find(ctxs.begin(), ctxs.end(), tl->cs) == ctxs.end())
                ctxs.push_back(tl->cs);
        if (strat != Strategy::kPoll) {  // kFlag watches its event marks so too
            watches.reserve(eng->to_watch.size());
            for (Mark* m : eng->to_watch) {
                Timeline* tl = m->tl;
                if (m->done) {
                    unwatch(m);
                    continue;
                }
                if (tl->cs->hostfns >= kHostFnsPerContext) {  // the backstop's queries find it
                    unwatch(m);
                    continue;
                }
                ++tl->cs->hostfns;
                Watch w{m, m->ev, tl->lane, false, tl->cs};
                if (!w.lane) {  // a lane of its own if one is idle or may be made; else share
                    auto& ls = tl->cs->lanes;
                    auto it = std::find_if(ls.begin(), ls.end(), [](Lane* l) { return l->users == 0; });
                    if (it != ls.end()) {
                        w.lane = *it;
                    } else if (ls.size() < kLanesPerContext) {
                        w.lane = new Lane{nullptr, 0};  // its stream is made below, before use
                        w.make_lane = true;
                        ls.push_back(w.lane);
                        ++eng->lanes;
                    } else {
                        w.lane = *std::min_element(ls.begin(), ls.end(), [](Lane* a, Lane* b) {
                            return a->users < b->users;
                        });
                    }
                    ++w.lane->users;
                    tl->lane = w.lane;
                }
                ++tl->watching;
                watches.push_back(w);
            }
            eng->to_watch.clear();
        } else {
            for (Mark* m : eng->to_watch) unwatch(m);  // queued before a switch to polling
            eng->to_watch.clear();
        }
    }
    // A reset (a new context id) retires the context before any of its handles is touched.
    for (CtxState* cs : ctxs)
        if (!still_current(cs)) progress = true;
    // Idle events past the pool's size, destroyed here (a reset destroyed a retired one's own).
    for (CtxState* cs : ctxs) {
        std::vector<CUevent> doomed;
        {
            Locked g;
            if (cs->retired) continue;
            doomed.swap(cs->doomed);
            eng->events -= doomed.size();
        }
        for (CUevent ev : doomed) api.cuEventDestroy(ev);
    }
    // A lane that cannot wait or launch fails that mark's awaits only; a sticky context error
    // behind it is found by the next query.
    for (Watch& w : watches) {
        bool retired;
        {
            Locked g;
            retired = w.cs->retired;
        }
        CUresult r = CUDA_SUCCESS;
        if (!retired && w.make_lane)
            r = with_ctx(w.cs->ctx, [&] { return api.cuStreamCreate(&w.lane->s, CU_STREAM_NON_BLOCKING); });
        if (!retired && r == CUDA_SUCCESS && !w.lane->s) r = CUDA_ERROR_INVALID_HANDLE;  // its making failed
        if (!retired && r == CUDA_SUCCESS) r = api.cuStreamWaitEvent(w.lane->s, w.ev, 0);
        if (!retired && r == CUDA_SUCCESS)
            r = api.cuLaunchHostFunc(w.lane->s, on_host_fn, reinterpret_cast<void*>(w.m->key));
        if (retired || r != CUDA_SUCCESS) {
            // The mark stays in its timeline unwatched: the backstop's queries complete it, in
            // stream order, and find a sticky error behind the failure if there is one.
            Locked g;
            --w.m->tl->watching;
            --w.cs->hostfns;
            if (!w.lane->s && !w.lane->dead) {  // never to be used again: lanes are made anew
                w.lane->dead = true;
                auto& ls = w.cs->lanes;
                ls.erase(std::remove(ls.begin(), ls.end(), w.lane), ls.end());
                --eng->lanes;
            }
            Timeline* tl = w.m->tl;  // unwatch() may free the mark: its timeline popped it
            unwatch(w.m);
            reap(tl);
        }
    }
    // Flag marks report no error: a sticky one stops the stream before its write. The backstop
    // asks an idle aiocuda stream of each context, which reports it (cuStreamQuery: "this
    // function may also return error codes from previous, asynchronous launches").
    if (backstop) {
        for (CtxState* cs : ctxs) {
            bool flags = false;
            {
                Locked g;
                if (cs->retired) continue;
                for (Timeline* tl : tls)
                    if (tl->cs == cs && tl->word && tl->head) flags = true;
            }
            if (!flags) continue;
            CUresult r = cs->probe ? CUDA_SUCCESS : with_ctx(cs->ctx, [&] {
                return api.cuStreamCreate(&cs->probe, CU_STREAM_NON_BLOCKING);
            });
            if (r == CUDA_ERROR_OUT_OF_MEMORY) {
                // A stream takes device memory, which a framework's caching allocator may hold
                // all of: aiocuda's own failure, not the context's. Tried again at the next
                // backstop; a sticky error makes the creation fail with its own code.
                cs->probe = nullptr;
                continue;
            }
            if (r == CUDA_SUCCESS) r = api.cuStreamQuery(cs->probe);
            if (r != CUDA_SUCCESS && r != CUDA_ERROR_NOT_READY) {
                Locked g;
                retire(cs, r);
                progress = true;
            }
        }
    }
    // Queries: every pass when polling; once per backstop period for the callback strategy, where
    // they find what host functions cannot report: the driver never calls them after an error.
    if (strat == Strategy::kPoll || backstop) {
        auto& marks = eng->queried;
        for (Timeline* tl : tls) {
            marks.clear();
            {
                Locked g;
                if (tl->cs->retired) continue;
                for (Mark* m = tl->head; m; m = m->next)
                    if (!m->done && m->ev) {  // not one that could not be placed
                        ++m->refs;  // kept while queried outside the lock
                        marks.push_back(m);
                    }
            }
            if (marks.empty()) continue;
            // The newest mark passed means all have; else walk from the oldest.
            CUresult r = api.cuEventQuery(marks.back()->ev);
            Mark* upto = r == CUDA_SUCCESS ? marks.back() : nullptr;
            Mark* failed = r != CUDA_SUCCESS && r != CUDA_ERROR_NOT_READY ? marks.back() : nullptr;
            for (size_t i = 0; r == CUDA_ERROR_NOT_READY && i + 1 < marks.size(); ++i) {
                r = api.cuEventQuery(marks[i]->ev);
                if (r == CUDA_SUCCESS) upto = marks[i];
                else if (r != CUDA_ERROR_NOT_READY) failed = marks[i];
                if (r == CUDA_SUCCESS) r = CUDA_ERROR_NOT_READY;  // keep walking
                else break;
            }
            Locked g;
            if (failed && failed->owned && !is_capture_error(r)) {
                retire(tl->cs, r);  // aiocuda's own event: the context is broken
            } else if (failed) {
                finish(failed, r);  // a foreign event, or a mark a capture took: that wait only
            } else if (upto) {
                passed(upto, CUDA_SUCCESS);
            }
            progress |= failed || upto;
            for (Mark* m : marks) unref(m);
        }
    }
    {
        Locked g;
        auto& act = eng->active;
        for (size_t i = 0; i < act.size();) {
            Timeline* tl = act[i];
            reap(tl);
            if (tl->cs->retired || idle(tl)) {
                tl->active = false;
                act[i] = act.back();
                act.pop_back();
                if (tl->kind == Timeline::kForeign && tl->alive == 0) delete tl;
                else park(tl);
            } else {
                ++i;
            }
        }
        sweep_parked(Clock::now());
        spare_placers(Clock::now());
    }
    return progress;
}

void engine_run() {
    name_this_thread("aiocuda-engine");
    // aiocuda's thread never captures, so thread-local mode lets it query and launch while a
    // user's thread captures in global mode (pytorch#104555 is this bug in NCCL's watchdog).
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    api.cuThreadExchangeStreamCaptureMode(&mode);
    auto last_progress = Clock::now();
    auto last_backstop = Clock::now();
#ifdef __linux__
    prctl(PR_SET_TIMERSLACK, 1000UL);  // the poll strategy's naps are tens of microseconds
#endif
    for (;;) {
        Strategy strat;
        auto now = Clock::now();
        auto backstop_every = std::chrono::milliseconds(g_backstop_ms.load());
        {
            std::unique_lock<std::mutex> g(eng->mu);
            eng->in_pass = false;
            eng->hold_cv.notify_all();
            while (eng->held || eng->active.empty()) {
                eng->sleeping = true;
                // Nothing to watch: asleep until a parked timeline is due to be dropped.
                eng->sleep_until = eng->held ? Clock::time_point::max()
                                             : sweep_parked(Clock::now());
                if (eng->held) eng->hold_cv.wait(g);
                else if (eng->sleep_until == Clock::time_point::max()) eng->cv.wait(g);
                else eng->cv.wait_until(g, eng->sleep_until);
                eng->sleeping = false;
                last_progress = now = Clock::now();
            }
            // Read after the wait: a switch meanwhile must not leave new marks unwatched.
            strat = current_strategy();
            if (strat != Strategy::kPoll) {
                // Between passes host functions report event marks, and this thread reads the
                // flag words: plain loads under the engine's lock, sleeping until one is due. A
                // pass (driver calls) runs for new watches, a kick, or the backstop.
                for (;;) {
                    now = Clock::now();
                    bool progress = false;
                    const FlagPlan& plan = read_flags(now, &progress);
                    spare_placers(now);
                    if (let_go(g, false)) continue;  // the lock was let go: look again
                    if (eng->held || !eng->to_watch.empty() || eng->kick ||
                        now >= last_backstop + backstop_every)
                        break;
                    if (plan.next > now) {
                        eng->sleeping = true;
                        eng->sleep_until = std::min(plan.next, last_backstop + backstop_every);
                        ++eng->naps;
                        if (eng->cv.wait_until(g, eng->sleep_until) == std::cv_status::timeout) {
                            // How late this machine wakes a sleeping thread (a moving average):
                            // the thread sets out that much earlier.
                            int64_t late = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                Clock::now() - eng->sleep_until).count();
                            eng->oversleep_ns += (late - eng->oversleep_ns) / 4;
                        }
                        eng->sleeping = false;
                        continue;
                    }
                    // Due: spin without the lock (the loop thread takes it to mark) on the due
                    // words alone, until one reaches its mark, the spin ends, another timeline
                    // wants a look, or something changes (Engine::poke).
                    auto until = std::min({plan.spin_until, plan.later,
                                           last_backstop + backstop_every});
                    uint32_t poke = eng->poke.load(std::memory_order_acquire);
                    g.unlock();
                    // The words are read after every pause, the clock and the poke once per
                    // kSpinReads: a pause took 25 ns on an AMD EPYC VM of this project's CI,
                    // and takes up to 140 cycles on Intel cores since Skylake (Intel's
                    // optimization reference manual, on Skylake's pause latency), so reading the
                    // words once per 64 pauses found a mark 1 us late at the median on that VM,
                    // against 0.1 us now (bench/native/spin_lag.cpp). A load of a line nobody
                    // writes costs no bus traffic.
                    Clock::time_point short_at{};  // a time every due word was short at
                    for (;;) {
                        auto t = Clock::now();
                        bool hit = false;
                        for (int i = 0; i < kSpinReads && !hit; ++i) {
                            for (auto& d : plan.due)
                                hit |= static_cast<int32_t>(__atomic_load_n(d.word, __ATOMIC_ACQUIRE) - d.seq) >= 0;
                            if (!hit) cpu_relax();
                        }
                        if (hit || eng->poke.load(std::memory_order_acquire) != poke || t >= until)
                            break;
                        short_at = t;  // (a word only grows: short after t, so short at t)
                    }
                    g.lock();
                    // What the spin saw teaches the due timelines their marks' time to within
                    // an iteration (learn()); each is still active (only pass() drops one, on
                    // this thread).
                    if (short_at != Clock::time_point{})
                        for (auto& d : plan.due) d.tl->looked = std::max(d.tl->looked, short_at);
                }
                now = Clock::now();
                strat = current_strategy();
            }
            if (eng->held) continue;
            eng->kick = false;
            eng->in_pass = true;
            let_go(g, true);
        }
        bool backstop = now - last_backstop >= backstop_every;
        if (backstop) last_backstop = now;
        if (pass(strat, backstop)) last_progress = Clock::now();
        if (strat == Strategy::kPoll) {
            auto quiet = Clock::now() - last_progress;
            if (quiet < kPollSpin) {
                for (int i = 0; i < 32; ++i) cpu_relax();
            } else {
                // Back off, in proportion to how long nothing happened; new marks wake it.
                auto nap = std::min<Clock::duration>(kPollMaxSleep, quiet / 64);
                std::unique_lock<std::mutex> g(eng->mu);
                eng->sleeping = true;
                eng->sleep_until = Clock::now() + nap;
                eng->cv.wait_until(g, eng->sleep_until);
                eng->sleeping = false;
            }
        }
    }
}

bool start_engine_locked() {
    if (eng->started) return true;
    if (!start_thread(engine_run)) return false;
    eng->started = true;
    ++eng->threads;
    return true;
}

// Runs on the driver's callback thread: native memory only, no GIL, no CUDA call.
// A host function completes at most this many awaits itself; a mark with more behind it goes to
// the engine thread. cuLaunchHostFunc: "Host functions without a mandated order (such as in
// independent streams) execute in undefined order and may be serialized": on one thread, with the
// process's other host functions, so each must stay short (NCCL's and torch's share it). Few
// awaits: the host function completes them, one hop as ever.
constexpr size_t kHostFnPushes = 64;

void on_host_fn(void* key) {
    Locked g;
    Mark* m = slot_get(reinterpret_cast<uintptr_t>(key));
    if (!m) return;
    Timeline* tl = m->tl;
    --tl->watching;
    --tl->cs->hostfns;
    m->watched = false;
    if (!tl->cs->retired && !m->done) {
        size_t behind = 0;  // passed(m) completes every earlier mark's awaits too
        for (Mark* p = tl->head; p && behind <= kHostFnPushes; p = p->next) {
            if (!p->done) behind += p->waiters;
            if (p == m) break;
        }
        if (behind > kHostFnPushes) {
            eng->seen.push_back(m);  // with the watch's reference
            ++eng->handed_over;
            eng->kick = true;
            eng->poke.fetch_add(1, std::memory_order_release);
            eng->cv.notify_one();
            return;
        }
        if (m->bell) {  // the newest flag mark before it was passed by now: its timeline learns
            Mark* last = nullptr;
            for (Mark* p = tl->head; p && p != m; p = p->next)
                if (p->flag && !p->done) last = p;
            if (last) learn(tl, last, Clock::now());
        }
        passed(m, CUDA_SUCCESS);
        reap(tl);  // hands the open mark, if any, to its placer
    }
    unref(m);  // the watch's reference
}

}  // namespace aiocuda::cuda
