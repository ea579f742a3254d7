// Timelines of streams, the mark an await puts on a stream, and the placers of open marks.
#include "engine_impl.hpp"

namespace aiocuda::cuda {

// The timeline of `stream` (or of the context, kDevice), made on first use and held by the caller
// until release_timeline(): the engine drops idle timelines nobody holds. Streams are told apart by
// cuStreamGetId ("unique for the life of the program"), not by handle: once a stream is destroyed
// its handle may name a new stream, which must not inherit its marks or word. `sid`: the id if the
// caller has it.
CUresult timeline_of(CtxState* cs, Timeline::Kind kind, uintptr_t stream, Timeline** out,
                     unsigned long long sid) {
    bool keyed = kind == Timeline::kStream && !is_legacy(stream);
    if (keyed && !sid) {
        CUresult r = api.cuStreamGetId(reinterpret_cast<CUstream>(stream), &sid);
        if (r != CUDA_SUCCESS) return r;
    }
    Locked g;
    Timeline*& tl = kind == Timeline::kDevice ? cs->device_tl
                    : keyed                   ? eng->streams[sid]
                                              : cs->legacy_tl;  // one legacy stream: one timeline
    if (!tl) {
        tl = new Timeline;
        tl->kind = kind;
        tl->cs = cs;
        tl->sid = sid;
        tl->stream = reinterpret_cast<CUstream>(keyed ? stream : kLegacyHandle);
        ++eng->timelines;
    }
    ++tl->users;
    *out = tl;
    return CUDA_SUCCESS;
}

void release_timeline(Timeline* tl) {
    Locked g;
    if (--tl->users == 0 && !tl->active) park(tl);  // the engine let go of it meanwhile
}

namespace {

// Under eng->mu: a stream's timeline that nothing refers to (no holder, mark, Event or lane).
bool droppable(Timeline* tl) {
    CtxState* cs = tl->cs;
    return tl->kind == Timeline::kStream && !tl->relay && tl != cs->legacy_tl && !tl->users &&
           !tl->alive && !tl->placing && !tl->placing_now() && !tl->open && !tl->head &&
           !tl->lane && !tl->active && !cs->retired;
}

}  // namespace

// Under eng->mu, once `tl` left the engine's list or its last holder let go (a thread, a mark): a
// timeline nothing refers to is parked, and dropped a while later (sweep_parked()) unless used
// again meanwhile.
void park(Timeline* tl) {
    if (!droppable(tl)) return;  // whatever still refers to it parks it when it lets go
    tl->idle_since = Clock::now();
    if (tl->parked) return;
    tl->parked = true;
    eng->parked.push_back(tl);
    if (eng->sleeping && eng->sleep_until == Clock::time_point::max())
        eng->wake_engine = true;  // to set a timer for it
}

// Under eng->mu, on the engine thread: drops the parked timelines idle for g_keep_idle_ms, and
// their words (every mark on one passed, so its stream writes it no more) go back to their
// context; lets go of those used again meanwhile. Returns when the next one is due (max: none).
// Kept a second by default, an await after a pause finds its stream's history (kFlag's
// estimate) and its stream known (record_known()): a decode loop awaiting 1 ms kernels one by
// one with 300 us of host work between woke at p50 50-63 us on the emulator when every backstop
// pass dropped the idle timeline, at 21-22 us with it kept.
Clock::time_point sweep_parked(Clock::time_point now) {
    const auto keep = std::chrono::milliseconds(g_keep_idle_ms.load());
    auto next = Clock::time_point::max();
    auto& ps = eng->parked;
    for (size_t i = 0; i < ps.size();) {
        Timeline* tl = ps[i];
        bool used = !droppable(tl);  // parked again when it is idle again
        if (used || now - tl->idle_since >= keep) {
            ps[i] = ps.back();
            ps.pop_back();
            tl->parked = false;
            if (!used) {
                eng->streams.erase(tl->sid);
                if (tl->word) tl->cs->words.emplace_back(tl->word, tl->dword);
                delete tl;
                --eng->timelines;
            }
            continue;
        }
        next = std::min(next, tl->idle_since + keep);
        ++i;
    }
    return next;
}

// A pooled event of `cs`, or a new one. Created in relaxed capture mode: event creation is no
// part of anyone's capture.
CUresult take_event(CtxState* cs, CUevent* ev) {
    {
        Locked g;
        if (!cs->pool.empty()) {
            *ev = cs->pool.back();
            cs->pool.pop_back();
            return CUDA_SUCCESS;
        }
    }
    CUresult r = relaxed_mode([&] {
        return with_ctx(cs->ctx, [&] { return api.cuEventCreate(ev, kEventFlags); });
    });
    if (r == CUDA_SUCCESS) {
        Locked g;
        ++eng->events;
    }
    return r;
}

// The one operation an await puts on the user's stream (or on the context, for device waits).
CUresult record_on(Timeline* tl, CUevent ev) {
    if (tl->kind == Timeline::kDevice) return api.cuCtxRecordEvent(tl->cs->ctx, ev);
    if (!is_legacy(reinterpret_cast<uintptr_t>(tl->stream))) return api.cuEventRecord(ev, tl->stream);
    return with_ctx(tl->cs->ctx, [&] { return api.cuEventRecord(ev, tl->stream); });
}

CUresult capture_status(Timeline* tl, CUstreamCaptureStatus* st) {
    *st = CU_STREAM_CAPTURE_STATUS_NONE;
    if (tl->kind != Timeline::kStream) return CUDA_SUCCESS;
    if (!is_legacy(reinterpret_cast<uintptr_t>(tl->stream)))
        return api.cuStreamIsCapturing(tl->stream, st);
    return with_ctx(tl->cs->ctx, [&] { return api.cuStreamIsCapturing(tl->stream, st); });
}

void wake_locked() {
    eng->kick = true;
    eng->poke.fetch_add(1, std::memory_order_release);
    if (eng->sleeping) eng->wake_engine = true;
}

// Under eng->mu: wake placer `p` once the lock is let go.
void wake_placer(Placer* p) {
    if (p->wake) return;
    p->wake = true;
    eng->wake_placers.push_back(p);
}

// A flag mark was placed: wake the engine thread only if it sleeps past when this one may pass,
// or if the mark is long enough to want a doorbell (read_flags()).
void nudge_locked(Timeline* tl) {
    eng->poke.fetch_add(1, std::memory_order_release);  // a spinning thread looks at it too
    if (!eng->sleeping) return;
    auto est = std::chrono::nanoseconds(tl->est_ns);
    if (Clock::now() + est - kFlagLead < eng->sleep_until || (est >= kBellSleep && !tl->bell))
        eng->wake_engine = true;
}

// kFlag: the word `tl`'s stream writes its marks to, taken from a page of registered host memory
// (one page per 64 timelines of a context). False: the driver cannot do it, and `tl` marks with
// events. Loop or placer thread, tl->record_mu held.
bool flag_word(Timeline* tl) {
    if (tl->word) return true;
    CtxState* cs = tl->cs;
    {
        Locked g;
        if (tl->kind != Timeline::kStream || cs->no_words || !api.cuStreamWriteValue32 ||
            !api.cuMemHostRegister || !api.cuMemHostGetDevicePointer)
            tl->no_flag = true;
        if (tl->no_flag) return false;
        if (!cs->words.empty()) {  // a dropped timeline's: its stream wrote its last value
            std::tie(tl->word, tl->dword) = cs->words.back();
            cs->words.pop_back();
            tl->issued = __atomic_load_n(tl->word, __ATOMIC_ACQUIRE);  // marks count on from it
            return true;
        }
    }
    void* page = nullptr;
    if (posix_memalign(&page, kFlagPage, kFlagPage) != 0) return false;
    std::memset(page, 0, kFlagPage);
    CUdeviceptr d = 0;
    bool registered = false;
    // cuMemHostRegister: "Page-locks the memory range [...] and maps it for the device(s)";
    // cuStreamWriteValue32: "If the memory was registered via cuMemHostRegister(), the device
    // pointer should be obtained with cuMemHostGetDevicePointer()." In relaxed mode: a host
    // registration during a capture is refused otherwise (vllm#46933: cudaHostRegister returned
    // cudaErrorStreamCaptureUnsupported), and this may run on a loop thread that captures.
    CUresult r = relaxed_mode([&] {
        return with_ctx(cs->ctx, [&] {
            CUresult rr = api.cuMemHostRegister(page, kFlagPage, kMemHostRegisterDeviceMap);
            registered = rr == CUDA_SUCCESS;
            if (registered) rr = api.cuMemHostGetDevicePointer(&d, page, 0);
            return rr;
        });
    });
    Locked g;
    if (r != CUDA_SUCCESS) {
        if (!registered) std::free(page);  // else leaked: unregistering it could fail the same way
        cs->no_words = tl->no_flag = true;
        return false;
    }
    char* base = static_cast<char*>(page);
    for (size_t off = kFlagPage; off > 0; off -= kFlagWordStride)
        cs->words.emplace_back(reinterpret_cast<uint32_t*>(base + off - kFlagWordStride),
                               d + off - kFlagWordStride);
    eng->words += kFlagPage / kFlagWordStride;
    std::tie(tl->word, tl->dword) = cs->words.back();
    cs->words.pop_back();
    // A fresh word reads 0: marks count on from there. A timeline whose word a capture took
    // (put()) comes here with its old count, which the new word's 0 would otherwise pass at once
    // from 2^31 marks on (sequence numbers compare cyclically).
    tl->issued = 0;
    return true;
}

// What put() placed on a stream.
struct Placed {
    CUevent ev = nullptr;
    bool flag = false;
    uint32_t seq = 0;
};

const char* const kCapturedText =
    "the stream began capturing a CUDA graph while aiocuda marked it (another thread began the "
    "capture), so the mark may be part of the graph and cannot tell when the work ends: await "
    "the stream after the capture ends";

// The one operation an await puts on the user's stream (or on the context, for device waits),
// then a second capture check (tl->record_mu held). A capture may begin between the check before
// and the mark, and a mark taken into a capture never tells when the stream's work ends: its
// awaits are refused (kCapturing), and a flag word a graph may write is never read again.
CUresult put(Timeline* tl, Placed* p, std::string* why, bool event = false) {
    CUresult r = CUDA_ERROR_NOT_SUPPORTED;
    if (!event && current_strategy() == Strategy::kFlag && flag_word(tl)) {
        p->flag = true;
        p->seq = tl->issued + 1;
        CUstream st = tl->stream;
        auto write = [&] {
            return api.cuStreamWriteValue32(st, tl->dword, p->seq, CU_STREAM_WRITE_VALUE_DEFAULT);
        };
        r = is_legacy(reinterpret_cast<uintptr_t>(st)) ? with_ctx(tl->cs->ctx, write) : write();
        if (r == CUDA_SUCCESS) tl->issued = p->seq;
        if (r == CUDA_ERROR_NOT_SUPPORTED) {  // no stream memory operations: events, from now on
            Locked g;
            tl->no_flag = true;
        }
    }
    if (r == CUDA_ERROR_NOT_SUPPORTED) {
        *p = Placed{};
        r = take_event(tl->cs, &p->ev);
        if (r == CUDA_SUCCESS) r = record_on(tl, p->ev);
    }
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    if (r == CUDA_SUCCESS && capture_status(tl, &st) == CUDA_SUCCESS &&
        st != CU_STREAM_CAPTURE_STATUS_NONE) {
        *why = kCapturedText;
        r = kCapturing;
        Locked g;
        if (p->flag) {  // the word may be written by every replay: earlier marks cannot trust it
            for (Mark* m = tl->head; m; m = m->next)
                if (m->flag && !m->done) finish(m, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
            tl->word = nullptr;
            tl->dword = 0;
        }
    }
    if (r != CUDA_SUCCESS && p->ev) {
        Locked g;
        if (!tl->cs->retired) give_back(tl->cs, p->ev);
        p->ev = nullptr;
    }
    return r;
}

// Places a mark on `tl` now (the caller holds tl->record_mu), for `n` and, if `user`, an Event.
CUresult place_now(Timeline* tl, Node* n, Mark** user, std::string* why) {
    {
        Locked g;
        if (!start_engine_locked()) return kNoThread;  // before the mark: it would never be seen
    }
    Placed p;
    CUresult r = put(tl, &p, why);
    Locked g;
    if (r == CUDA_SUCCESS && tl->cs->retired)  // a reset or an error meanwhile: refused (its
        r = tl->cs->error;                     // handles, this event too, are no longer ours)
    if (r != CUDA_SUCCESS) return r;
    Mark* m = new_mark(tl);
    m->flag = p.flag;
    m->seq = p.seq;
    placed(tl, m, p.ev);
    if (n) attach(m, n);
    if (user) {
        ++m->refs;
        *user = m;
    }
    activate(tl);
    if (p.flag) nudge_locked(tl); else wake_locked();
    return CUDA_SUCCESS;
}

const char* const kCapturingText =
    "the stream is capturing a CUDA graph: its work will not run until the graph is launched, so "
    "awaiting it now would never finish; await it after the capture ends (or await the graph's "
    "replay, aiocuda.torch.replay)";

// An await is refused while its stream captures.
CUresult refuse_capturing(CUresult r, CUstreamCaptureStatus st, std::string* why) {
    if (r != CUDA_SUCCESS || st == CU_STREAM_CAPTURE_STATUS_NONE) return r;
    *why = kCapturingText;
    return kCapturing;
}

// Under eng->mu: join `tl`'s open mark if kMarksInFlight are out (or one is open already); false
// if this await may place its own mark. Joining needs no driver call, so it never waits behind a
// placement that a full stream holds up.
bool join_open(Timeline* tl, Node* n, Mark** user, CUresult* res) {
    *res = CUDA_SUCCESS;
    if (tl->cs->retired) {
        if (n) discard(n);
        *res = tl->cs->error;
        return true;
    }
    reap(tl);
    if (tl->in_flight < kMarksInFlight && !tl->open && !tl->placing_now()) return false;
    // The threads that place the open mark and learn it was passed, before anything changes.
    if (!start_engine_locked() || (!tl->open && !start_placer(tl->cs->device))) {
        if (n) discard(n);
        *res = kNoThread;
        return true;
    }
    if (!tl->open) tl->open = new_mark(tl);
    if (n) attach(tl->open, n);
    if (user) {
        ++tl->open->refs;
        *user = tl->open;
    }
    if (activate(tl)) wake_locked();
    want_placing(tl);  // room may have freed up since the open mark was made
    return true;
}

// Places a mark for `n` on `tl` (its capture checked, held by the caller), or joins the open mark
// if others marked meanwhile.
CUresult place_or_join(Timeline* tl, Node* n, Mark** user, std::string* why) {
    std::lock_guard<std::mutex> order(tl->record_mu);
    CUresult r;
    {
        Locked g;
        if (join_open(tl, n, user, &r)) return r;
    }
    r = place_now(tl, n, user, why);
    if (r != CUDA_SUCCESS && n) discard(n);
    return r;
}

// Loop thread: mark `tl` for `n` (and an Event), or join its open mark when kMarksInFlight are out.
// `checked`: the caller found the stream not capturing (a capture that began since is found after
// the mark, as one that begins between this check and the mark is).
CUresult mark(Timeline* tl, Node* n, Mark** user, std::string* why, bool checked) {
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    CUresult r = checked ? CUDA_SUCCESS : capture_status(tl, &st);
    r = refuse_capturing(r, st, why);
    if (r != CUDA_SUCCESS) {
        if (n) discard(n);
        return r;
    }
    {
        Locked g;
        if (join_open(tl, n, user, &r)) return r;
    }
    return place_or_join(tl, n, user, why);
}

// ---- placers: open marks and doorbells, threads per device --------------------------------------

void placer_run(Placer* p);


// Under eng->mu, on the loop thread: the placer of device `dev`, started with the device's first
// open mark (so that host functions, which hand it work, never start a thread).
bool start_placer(int dev) {
    auto& ps = eng->placers;
    if (ps.size() <= static_cast<size_t>(dev)) ps.resize(dev + 1, nullptr);
    if (ps[dev]) return true;
    auto p = new Placer;
    if (!start_thread(placer_run, p)) {
        delete p;
        return false;
    }
    ps[dev] = p;
    p->threads = 1;
    ++eng->threads;
    return true;
}

// Under eng->mu: queue `tl` for its device's placer if its open mark has room now.
void want_placing(Timeline* tl) {
    if (!tl->open || tl->placing || tl->cs->retired || tl->in_flight >= kMarksInFlight) return;
    Placer* p = eng->placers[tl->cs->device];  // started with the open mark
    tl->placing = true;
    ++tl->users;  // the placer's, until it is done with it (placer_run): never dropped meanwhile
    if (p->queue.empty() && p->bells.empty()) p->waiting_since = Clock::now();
    p->queue.push_back(tl);
    wake_placer(p);
}

// Under eng->mu, on the engine thread: queue a doorbell mark for `tl` with its device's placer.
// Never on the legacy stream: a record there is an action on "an implicit stream with legacy
// synchronization behavior" (cuda.h, CU_STREAM_LEGACY), a barrier with every blocking stream of
// the context, which aiocuda adds only for an await; its timeline naps.
void want_bell(Timeline* tl) {
    if (tl->bell || tl->cs->retired || current_strategy() == Strategy::kPoll ||
        tl->kind != Timeline::kStream || is_legacy(reinterpret_cast<uintptr_t>(tl->stream)) ||
        tl->cs->hostfns >= kHostFnsPerContext)  // (bells asked for meanwhile: pass() caps them)
        return;
    int dev = tl->cs->device;
    if (!start_placer(dev)) return;  // no thread for it: the engine naps on
    Placer* p = eng->placers[dev];
    tl->bell = true;
    ++tl->users;  // the placer's, as for an open mark
    if (p->queue.empty() && p->bells.empty()) p->waiting_since = Clock::now();
    p->bells.push_back(tl);
    wake_placer(p);
}

namespace {
thread_local uint64_t t_ticket = 0;  // this placer's touch under way (begin_touch()), else 0
}

void begin_touch() {
    if (t_ticket) return;
    eng->touching.push_back(eng->touch_tickets + 1);  // first: it may throw (no memory)
    t_ticket = ++eng->touch_tickets;
}

void end_touch() {
    if (!t_ticket) return;
    Locked g;
    auto& v = eng->touching;
    v.erase(std::find(v.begin(), v.end(), t_ticket));
    t_ticket = 0;
    eng->touch_cv.notify_all();
}

// Ends this placer's touch, if one began, once the placement returns (after its own sections of
// eng->mu: this takes the lock again).
struct TouchGuard {
    TouchGuard() = default;
    TouchGuard(const TouchGuard&) = delete;
    TouchGuard& operator=(const TouchGuard&) = delete;
    ~TouchGuard() { end_touch(); }
};

// The placer: a doorbell mark at the end of `tl`'s stream, if a flag mark still waits there. An
// event mark, checked for a capture after its record as every mark is (put()).
void place_bell(Timeline* tl) {
    TouchGuard touch;
    std::lock_guard<std::mutex> order(tl->record_mu);
    if (!still_current(tl->cs)) {
        Locked g;
        tl->bell = false;  // asked for again at a later look, if still late
        return;
    }
    {
        // Only for a mark the stream has not passed yet (its word says), that someone still
        // waits for (wanted()): once the program has synchronized the stream, or closed the
        // loops of its awaits, no doorbell touches its handle. An open mark of awaits cancelled
        // on a loop that still runs may still be placed there (place_open), which is why the
        // docs ask for one more await before the stream is destroyed (troubleshooting.md, "A
        // stream must stay alive").
        Locked g;
        Mark* oldest = nullptr;
        bool anyone = false;  // waits for a flag mark not passed yet (else: as if passed)
        for (Mark* m = tl->head; m && !anyone; m = m->next) {
            if (!m->flag || m->done) continue;
            if (!oldest) oldest = m;
            anyone = wanted(m);
        }
        if (!anyone || !tl->word || tl->cs->retired ||
            static_cast<int32_t>(__atomic_load_n(tl->word, __ATOMIC_ACQUIRE) - oldest->seq) >= 0) {
            tl->bell = false;
            return;
        }
        // An enqueue, which blocks while the stream is full: meanwhile awaits join an open mark
        // (join_open()) rather than wait for record_mu on the loop thread. And no await of
        // this stream ends until the doorbell is down (read_flags()): the program may destroy
        // the stream once they have, and the doorbell touches it.
        tl->ringing = true;
        begin_touch();
    }
    CUstreamCaptureStatus st;
    CUresult r = capture_status(tl, &st);
    if (r == CUDA_SUCCESS && st != CU_STREAM_CAPTURE_STATUS_NONE) r = kCapturing;
    Placed p;
    std::string why;
    if (r == CUDA_SUCCESS) r = put(tl, &p, &why, true);
    Locked g;
    tl->ringing = false;
    want_placing(tl);  // an open mark made meanwhile
    wake_locked();     // for the marks that passed meanwhile
    if (eng->sync_waiters) eng->placed_cv.notify_all();  // an Event's synchronize, likewise
    if (r != CUDA_SUCCESS || tl->cs->retired) {  // put() gave the event back; a reset took it
        tl->bell = false;  // asked for again at a later look, if still late
        return;
    }
    Mark* m = new_mark(tl);
    m->bell = true;
    placed(tl, m, p.ev);  // watched by a lane, as the callback strategy's marks are
    ++eng->bells;
    activate(tl);
}

// Places `tl`'s open mark; false if it must wait (the stream is capturing: after it ends).
bool place_open(Timeline* tl) {
    TouchGuard touch;
    std::lock_guard<std::mutex> order(tl->record_mu);
    Mark* open;
    bool unwanted;
    {
        Locked g;
        tl->placing = false;
        open = tl->open;
        if (!open || tl->cs->retired || tl->in_flight >= kMarksInFlight) return true;
        unwanted = !wanted(open);  // its loops closed: the stream is not touched for it
        if (!unwanted) begin_touch();
    }
    // A reset since the open mark was queued destroyed the stream and the pooled events: find it
    // (and retire the context) before touching any of them.
    if (!still_current(tl->cs)) return true;
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    CUresult r = unwanted ? kUnwanted : capture_status(tl, &st);
    if (r == CUDA_SUCCESS && st != CU_STREAM_CAPTURE_STATUS_NONE) return false;
    {
        Locked g;
        if (tl->open != open || tl->cs->retired) return true;  // failed meanwhile
        if (unwanted && wanted(open)) {  // an await joined it meanwhile: placed the usual way
            want_placing(tl);
            return true;
        }
        // From here on no await may join this mark: its mark may reach the stream before work
        // the await's caller enqueued after it (a cuStreamWaitEvent, say), which the await must
        // cover. Awaits meanwhile open a new mark, placed after this one (join_open()).
        tl->open = nullptr;
        tl->taken = open;
    }
    Placed p;
    std::string why;
    if (r == CUDA_SUCCESS) r = put(tl, &p, &why);
    if (r == kCapturing) r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;  // taken into a capture
    Locked g;
    tl->taken = nullptr;
    if (tl->cs->retired) {  // a reset or an error meanwhile (retire() failed `open` already)
        r = tl->cs->error;
        p.ev = nullptr;
    }
    if (r != CUDA_SUCCESS) {
        // Only these awaits fail: a capture that began meanwhile, or no memory for an event, is
        // no context error (a sticky one the next query of this context finds); nobody waits
        // for kUnwanted's. They fail in stream order: after the marks placed before, which may
        // still be pending.
        open->fail = r;
        if (tl->tail) tl->tail->next = open; else tl->head = open;
        tl->tail = open;  // unplaced: no event, never queried or watched
        reap(tl);
        want_placing(tl);  // an open mark made meanwhile
        return true;
    }
    open->flag = p.flag;
    open->seq = p.seq;
    placed(tl, open, p.ev);
    activate(tl);  // (it stayed active: idle() counts a placement under way)
    if (p.flag) nudge_locked(tl); else wake_locked();
    want_placing(tl);  // an open mark made meanwhile
    return true;
}

// Under eng->mu, on the engine thread: another thread for each device whose queued work waited
// kPlacerStuck with none of its placers idle.
void spare_placers(Clock::time_point now) {
    for (Placer* p : eng->placers) {
        if (!p || p->idle > 0 || p->waiting_since == Clock::time_point{} ||
            now - p->waiting_since < kPlacerStuck || p->threads >= kPlacersPerDevice)
            continue;
        p->waiting_since = now;  // the next one, if still stuck, a while later
        if (!start_thread(placer_run, p)) continue;  // no thread: tried again then
        ++p->threads;
        ++eng->threads;
    }
}

// Timelines whose open mark waits for a capture to end, for any of the device's threads to
// retry (Placer::capturing): the thread that found the capture may next block in an enqueue on a
// full stream, and their awaits then waited for as long as it did.
void keep_capturing(Placer* p, std::vector<Timeline*>& later) {
    Locked g;
    if (p->waiting_since == Clock::time_point{}) p->waiting_since = Clock::now();
    p->capturing.insert(p->capturing.end(), later.begin(), later.end());
    later.clear();
    wake_placer(p);  // an idle thread retries them after kCaptureRetry
}

uint64_t touches_begun() {
    std::lock_guard<std::mutex> g(eng->mu);
    return eng->touch_tickets;
}

bool settle_touches(uint64_t before, std::chrono::milliseconds bound) {
    std::unique_lock<std::mutex> g(eng->mu);
    auto settled = [&] {
        for (uint64_t t : eng->touching)
            if (t <= before) return false;
        return true;
    };
    return eng->touch_cv.wait_for(g, bound, settled);
}

void placer_run(Placer* p) {
    name_this_thread("aiocuda-placer");
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    api.cuThreadExchangeStreamCaptureMode(&mode);
    std::vector<Timeline*> later, retry;  // open marks of capturing streams (Placer::capturing)
    for (;;) {
        Timeline* tl = nullptr;
        bool bell = false;
        {
            std::unique_lock<std::mutex> g(eng->mu);
            auto ready = [&] { return (!p->queue.empty() || !p->bells.empty()) && !eng->held; };
            ++p->idle;
            if (p->capturing.empty()) p->cv.wait(g, [&] { return ready() || !p->capturing.empty(); });
            if (!ready()) p->cv.wait_for(g, kCaptureRetry, ready);  // a capture to end
            while (eng->held) eng->hold_cv.wait(g);
            --p->idle;
            for (Timeline* t : p->capturing)  // kept, unless queued again meanwhile
                if (!t->placing) retry.push_back(t); else --t->users;
            p->capturing.clear();
            if (!p->queue.empty()) {  // one at a time, in the order asked
                tl = p->queue.front();
                p->queue.erase(p->queue.begin());
            } else if (!p->bells.empty()) {
                tl = p->bells.front();
                p->bells.erase(p->bells.begin());
                bell = true;
            }
            if (p->queue.empty() && p->bells.empty()) p->waiting_since = {};
            else if (tl) p->waiting_since = Clock::now();  // the rest: counted from now
            if (!p->queue.empty() || !p->bells.empty()) p->cv.notify_one();  // an idle one
            ++eng->placing;
        }
        for (Timeline* t : retry)
            if (!place_open(t)) later.push_back(t); else release_timeline(t);
        retry.clear();
        if (!later.empty()) keep_capturing(p, later);  // before an enqueue that may block
        if (tl && bell) {
            place_bell(tl);
            release_timeline(tl);
        } else if (tl) {
            if (!place_open(tl)) later.push_back(tl); else release_timeline(tl);
        }
        if (!later.empty()) keep_capturing(p, later);
        Locked g;
        if (--eng->placing == 0) eng->hold_cv.notify_all();
    }
}

}  // namespace aiocuda::cuda
