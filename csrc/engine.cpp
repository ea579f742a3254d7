// The completion engine. The data path, one await on a CUDA stream:
//
//   loop thread (GIL released)  wait_stream: stream -> the stream's timeline (by cuStreamGetId;
//                               a stream new to aiocuda through its context's state);
//                               cuStreamIsCapturing; then either a mark (the one operation
//                               put on the user's stream: kFlag, cuStreamWriteValue32 of the
//                               timeline's next sequence number into a word of host memory; else a
//                               cuEventRecord of a pooled event), a second cuStreamIsCapturing (a
//                               capture may begin between the check and the mark), or, past
//                               kMarksInFlight, a place on the timeline's open mark
//   engine thread               learns that marks were passed (kFlag: a plain load of each
//                               timeline's word, spinning only while a completion is due, sleeping
//                               otherwise; kPoll: cuEventQuery; kCallback: a host function on an
//                               aiocuda "lane" stream that waits on the mark), places open marks
//                               when room frees up, and checks contexts for sticky errors and resets
//   completion                  every await behind a passed mark (and behind every earlier mark
//                               of its timeline: stream order) is pushed to its loop's queue
//
// Nothing aiocuda puts on a user's stream holds it up (an event record or a memory write never
// blocks later work); host functions, stream waits, queries and synchronizes happen only on
// aiocuda's own threads and streams, which run in thread-local capture mode (its calls on the
// loop thread in relaxed mode), so a user's capture, elsewhere or on the loop thread, stays
// valid. What aiocuda holds is bounded by the streams it watches, not by the awaits. The other parts are in the files engine_impl.hpp lists.
#include "engine_impl.hpp"

namespace aiocuda::cuda {

Engine* eng = new Engine;
std::atomic<int> g_strategy{-1};  // -1: not chosen yet (AIOCUDA_STRATEGY, else kFlag)
std::atomic<int> g_backstop_ms{20};
std::atomic<int> g_keep_idle_ms{1000};
std::atomic<int> g_fail_starts{0};

Strategy current_strategy() {
    int s = g_strategy.load(std::memory_order_relaxed);
    if (s < 0) {
        const char* e = std::getenv("AIOCUDA_STRATEGY");
        s = !e ? 2 : std::strcmp(e, "poll") == 0 ? 1 : std::strcmp(e, "callback") == 0 ? 0 : 2;
        g_strategy.store(s, std::memory_order_relaxed);
    }
    return static_cast<Strategy>(s);
}

CUresult wait_stream(uintptr_t stream, int device, Node* n, std::string* why) {
    return record(stream, device, n, nullptr, why);
}

CUresult check_stream(uintptr_t stream, int device, std::string* why) {
    CtxState* cs = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = stream_ctx(stream, device, &cs, why);
    if (r != CUDA_SUCCESS || !cs || is_legacy(stream)) return r;  // (the await checks those)
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    r = api.cuStreamIsCapturing(reinterpret_cast<CUstream>(stream), &st);
    return refuse_capturing(r, st, why);
}

// An await on a stream aiocuda already has a timeline of (by cuStreamGetId: a new stream that
// reuses a destroyed one's handle has a new id), on a live context of the device asked for: no
// context lookup, and one lock round trip when it joins the open mark. False: the caller takes
// the general way, told the stream's id in *sid if it is not capturing (else 0).
bool record_known(uintptr_t stream, int device, Node* n, Mark** user, std::string* why,
                  CUresult* res, unsigned long long* sid) {
    CUstream h = reinterpret_cast<CUstream>(stream);
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    if (api.cuStreamGetId(h, sid) != CUDA_SUCCESS ||
        api.cuStreamIsCapturing(h, &st) != CUDA_SUCCESS || st != CU_STREAM_CAPTURE_STATUS_NONE) {
        *sid = 0;
        return false;  // refused the general way, with its checks first
    }
    Timeline* tl;
    {
        Locked g;
        auto it = eng->streams.find(*sid);
        if (it == eng->streams.end()) return false;
        tl = it->second;
        if (tl->cs->retired || (device >= 0 && tl->cs->device != device)) return false;
        if (join_open(tl, n, user, res)) return true;
        ++tl->users;
    }
    *res = place_or_join(tl, n, user, why);
    release_timeline(tl);
    return true;
}

CUresult record(uintptr_t stream, int device, Node* n, Mark** user, std::string* why) {
    CtxState* cs = nullptr;
    unsigned long long sid = 0;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS && !is_legacy(stream) && stream != kPerThreadHandle &&
        record_known(stream, device, n, user, why, &r, &sid))
        return r;
    if (r == CUDA_SUCCESS) r = stream_ctx(stream, device, &cs, why);
    if (r != CUDA_SUCCESS) {
        if (n) discard(n);
        return r;
    }
    if (!cs) {  // no context on that device: nothing was queued, so nothing to wait for
        {
            Locked g;
            Timeline* tl = new Timeline;  // a done mark for the Event, on a throwaway timeline
            tl->kind = Timeline::kForeign;
            static CtxState none{};
            none.retired = true;
            tl->cs = &none;
            Mark* m = new_mark(tl);
            m->done = true;
            if (user) *user = m; else unref(m);
        }
        if (n) complete(n, CUDA_SUCCESS);  // an eventfd write: never under the engine's lock
        return CUDA_SUCCESS;
    }
    Timeline* tl;
    if ((r = timeline_of(cs, Timeline::kStream, stream, &tl, sid)) != CUDA_SUCCESS) {
        if (n) discard(n);
        return r;
    }
    r = mark(tl, n, user, why, sid != 0);  // (checked for a capture a moment ago)
    release_timeline(tl);
    return r;
}

const char* const kCapturedEventText =
    "the event was last recorded inside a CUDA graph capture, so it does not stand for work that "
    "will run: await it after recording it outside the capture (or await the graph's replay)";

// How many awaits are pending on `tl` (under eng->mu): on a relay, the waits it holds queued.
size_t load_of(Timeline* tl) {
    size_t n = tl->open ? tl->open->waiters : 0;
    for (Mark* m = tl->head; m; m = m->next) n += m->waiters;
    return n;
}

// A relay stream of `cs` for a foreign event: an idle one, a new one while there are fewer than
// kRelays, else the least loaded (its awaits may then over-wait behind another event's work). A
// relay holds at most kRelayWaits waits: an enqueue on a full stream would block the loop thread.
CUresult take_relay(CtxState* cs, int device, Timeline** out, std::string* why) {
    {
        Locked g;
        Timeline* best = nullptr;
        for (Timeline* tl : cs->relays)
            if (!best || load_of(tl) < load_of(best)) best = tl;
        if (best && (load_of(best) == 0 || cs->relays.size() >= kRelays)) {
            if (load_of(best) >= kRelayWaits) {
                *why = "too many CUDA event awaits are pending on device " + std::to_string(device) +
                       " (" + std::to_string(kRelays * kRelayWaits) + "): await fewer events at "
                       "once, or await the streams they were recorded on";
                return kTooMany;
            }
            ++best->users;
            *out = best;
            return CUDA_SUCCESS;
        }
    }
    CUstream st = nullptr;
    CUresult r = relaxed_mode([&] {
        return with_ctx(cs->ctx, [&] { return api.cuStreamCreate(&st, CU_STREAM_NON_BLOCKING); });
    });
    if (r != CUDA_SUCCESS) return r;
    auto tl = new Timeline;
    tl->kind = Timeline::kStream;
    tl->cs = cs;
    tl->relay = true;
    tl->stream = st;
    tl->users = 1;
    Locked g;
    cs->relays.push_back(tl);
    *out = tl;
    return CUDA_SUCCESS;
}

CUresult wait_event(uintptr_t event, int device, Node* n, std::string* why) {
    CUcontext ctx = nullptr;
    CtxState* cs = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = check_device(device, why);
    if (r == CUDA_SUCCESS) r = primary_of(device, &ctx);
    if (r == CUDA_SUCCESS && ctx) r = ctx_state(ctx, &cs, why);
    if ((r == CUDA_SUCCESS && !ctx) || primary_inactive(device, r)) {
        *why = "CUDA device " + std::to_string(device) + " has no active context, so the event "
               "cannot have been recorded there: pass the device the event belongs to";
        r = kBadDevice;
    }
    if (r != CUDA_SUCCESS) {
        discard(n);
        return r;
    }
    // Read the event now, on this thread: cuEventRecord's other APIs "use the most recently
    // captured state at the time of the API call", and its owner may record it again or destroy it
    // (torch does both) once this await has ended or was cancelled. A query (relaxed capture
    // mode) says whether it has passed, or was last recorded inside a capture, which aiocuda must
    // never wait on ("CUDA_ERROR_CAPTURED_EVENT: the operation is not permitted on an event which
    // was last recorded in a capturing stream"); otherwise one of aiocuda's relay streams waits on
    // it (an enqueue, which reads it now) and is marked like any stream.
    CUevent ev = reinterpret_cast<CUevent>(event);
    r = relaxed_mode([&] { return api.cuEventQuery(ev); });
    if (r == CUDA_SUCCESS) {
        complete(n, CUDA_SUCCESS);
        return CUDA_SUCCESS;
    }
    if (r == CUDA_ERROR_CAPTURED_EVENT) *why = kCapturedEventText, r = kCapturing;
    Timeline* relay = nullptr;
    if (r == CUDA_ERROR_NOT_READY) r = take_relay(cs, device, &relay, why);
    if (r == CUDA_SUCCESS) r = api.cuStreamWaitEvent(relay->stream, ev, 0);
    if (r != CUDA_SUCCESS) {
        discard(n);
    } else if ((r = mark(relay, n, nullptr, why)) == kCapturing) {
        // The event was recorded into a capture after the query: the relay joined that capture
        // and is never used again (the capture cannot end cleanly; nothing aiocuda can undo).
        *why = kCapturedEventText;
        Locked g;
        auto& rs = cs->relays;
        rs.erase(std::remove(rs.begin(), rs.end(), relay), rs.end());
    }
    if (relay) release_timeline(relay);
    return r;
}

// The event behind a mark a thread wants to query or wait on, once its context is known to be
// the one it was made in (a reset destroyed the events of the one before); else its result.
CUresult mark_event(Mark* m, bool wait_placed, CUevent* ev) {
    CtxState* cs;
    {
        std::unique_lock<std::mutex> g(eng->mu);
        if (wait_placed && !m->done && !m->placed) {
            // Counted as the word's waiters below are: finish() wakes only counted waiters, and
            // an open mark whose placing failed may be finished by a later mark of its stream
            // passing, with no placement or failure notice after (the thread slept for good).
            ++eng->sync_waiters;
            eng->placed_cv.wait(g, [&] { return m->done || m->placed; });
            --eng->sync_waiters;
        }
        if (m->done) return m->status;
        if (!m->placed) return CUDA_ERROR_NOT_READY;
        cs = m->tl->cs;
        *ev = m->ev;
    }
    if (!still_current(cs)) {  // a reset dropped the work: the word will never be written
        Locked g;
        return m->status;
    }
    if (m->flag) {  // no event: the word tells (a plain load), or the engine finishes the mark
        // Not while the placer puts a doorbell on the stream: the program may destroy the
        // stream once its Event says done, as once its awaits have ended (read_flags()).
        std::unique_lock<std::mutex> g(eng->mu);
        auto passed = [&] {
            Timeline* tl = m->tl;
            return m->done || (tl->word && !tl->ringing &&
                               static_cast<int32_t>(__atomic_load_n(tl->word, __ATOMIC_ACQUIRE) -
                                                    m->seq) >= 0);
        };
        if (wait_placed && !passed()) {  // the backstop finishes it on a sticky error or reset
            ++eng->sync_waiters;
            eng->placed_cv.wait(g, passed);
            --eng->sync_waiters;
        }
        return m->done ? m->status : passed() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
    }
    return CUDA_SUCCESS;
}
CUresult mark_query(Mark* m, std::string* why) {
    CUevent ev = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = mark_event(m, false, &ev);
    if (r != CUDA_SUCCESS || !ev) return r;
    return relaxed_mode([&] { return api.cuEventQuery(ev); });
}

CUresult mark_synchronize(Mark* m, std::string* why) {
    CUevent ev = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = mark_event(m, true, &ev);
    if (r != CUDA_SUCCESS || !ev) return r;
    // A blocking-sync event: the thread sleeps instead of spinning.
    return relaxed_mode([&] { return api.cuEventSynchronize(ev); });
}

void mark_release(Mark* m) {
    if (!m || m->owner != eng) return;  // a forked child's copy of the parent's: leave it
    Locked g;
    unref(m);
}

void set_strategy(Strategy s) {
    int old = g_strategy.exchange(static_cast<int>(s));
    Locked g;
    if (old != static_cast<int>(s) && s != Strategy::kPoll) {
        // Every placed event mark not watched yet gets a host function (flag marks are read
        // whatever the strategy).
        for (Timeline* tl : eng->active)
            for (Mark* m = tl->head; m; m = m->next)
                if (!m->done && !m->watched && !m->flag && m->placed) watch(m);
    }
    wake_locked();
}

Strategy strategy() { return current_strategy(); }

void set_backstop_period_ms(int ms) { g_backstop_ms = std::max(1, ms); }

void set_keep_idle_ms(int ms) {
    g_keep_idle_ms = std::max(0, ms);
    Locked g;
    if (eng->sleeping) eng->wake_engine = true;  // its timer for the parked timelines moved
}

void fail_thread_starts(int n) { g_fail_starts = std::max(0, n); }

void hold(bool on) {
    std::unique_lock<std::mutex> g(eng->mu);
    eng->held = on;
    eng->poke.fetch_add(1, std::memory_order_release);
    eng->hold_cv.notify_all();
    eng->cv.notify_all();
    if (!on)
        for (Placer* p : eng->placers)
            if (p) p->cv.notify_all();
    if (on)
        eng->hold_cv.wait(g, [] { return !eng->in_pass && eng->placing == 0 && !eng->pushing; });
}

void after_fork_in_child() {
    // Only this thread exists now: the parent's locks may be held forever and its records belong
    // to its queues. Start from a fresh engine and leak the old one.
    eng = new Engine;
    mark_forked();
}

Stats stats() {
    Locked g;
    return Stats{eng->pending, eng->marks, eng->events,    eng->lanes,       eng->threads,
                 eng->words,   eng->timelines, eng->parked.size(), eng->handed_over,
                 eng->bells,   eng->naps};
}

}  // namespace aiocuda::cuda
