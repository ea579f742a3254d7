// Whole-device waits: a context-wide mark (cuCtxRecordEvent), or on older drivers a thread per
// device calling cuCtxSynchronize.
#include "engine_impl.hpp"

namespace aiocuda::cuda {

void device_waiter_run(DeviceWaiter* w) {
    name_this_thread("aiocuda-devsync");
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    api.cuThreadExchangeStreamCaptureMode(&mode);
    api.cuCtxSetCurrent(w->ctx);
    std::vector<std::pair<Node*, unsigned long long>> taken;
    for (;;) {
        {
            std::unique_lock<std::mutex> g(w->mu);
            w->cv.wait(g, [&] { return !w->waiting.empty(); });
            taken.swap(w->waiting);
        }
        CUresult r = api.cuCtxSynchronize();  // covers all work queued before these requests
        unsigned long long now = 0;
        CUresult id = api.cuCtxGetId(w->ctx, &now);
        for (auto& [n, asked_in] : taken)
            complete(n, r != CUDA_SUCCESS ? r
                        : id != CUDA_SUCCESS ? id
                        : asked_in != now ? CUDA_ERROR_CONTEXT_IS_DESTROYED : CUDA_SUCCESS);
        taken.clear();
    }
}

CUresult wait_device(int device, Node* n, std::string* why) {
    CUcontext ctx = nullptr;
    CtxState* cs = nullptr;
    CUresult r = check_ready(why);
    if (r == CUDA_SUCCESS) r = check_device(device, why);
    if (r == CUDA_SUCCESS) r = primary_of(device, &ctx);
    if (r == CUDA_SUCCESS && !ctx) {  // no context: nothing was queued on the device
        complete(n, CUDA_SUCCESS);
        return CUDA_SUCCESS;
    }
    if (r == CUDA_SUCCESS && api.cuCtxRecordEvent) r = ctx_state(ctx, &cs, why);
    if (primary_inactive(device, r)) {  // reset, not retained again: nothing is queued
        why->clear();
        complete(n, CUDA_SUCCESS);
        return CUDA_SUCCESS;
    }
    if (r != CUDA_SUCCESS) {
        discard(n);
        return r;
    }
    if (cs) {
        Timeline* tl;
        timeline_of(cs, Timeline::kDevice, 0, &tl);  // no driver call for a device timeline
        r = mark(tl, n, nullptr, why);
        release_timeline(tl);
        return r;
    }
    DeviceWaiter* w;
    {
        Locked g;
        auto& ws = eng->device_waiters;
        if (ws.size() <= static_cast<size_t>(device)) ws.resize(device + 1, nullptr);
        if (!ws[device]) {
            auto* dw = new DeviceWaiter;
            dw->ctx = ctx;
            if (!start_thread(device_waiter_run, dw)) {
                delete dw;
                discard(n);
                return kNoThread;
            }
            ws[device] = dw;
            ++eng->threads;
        }
        w = ws[device];
    }
    unsigned long long id = 0;
    r = api.cuCtxGetId(ctx, &id);
    if (primary_inactive(device, r)) {
        complete(n, CUDA_SUCCESS);
        return CUDA_SUCCESS;
    }
    if (r != CUDA_SUCCESS) {
        discard(n);
        return r;
    }
    {
        std::lock_guard<std::mutex> g(w->mu);
        w->waiting.emplace_back(n, id);
    }
    w->cv.notify_one();
    return CUDA_SUCCESS;
}

}  // namespace aiocuda::cuda
