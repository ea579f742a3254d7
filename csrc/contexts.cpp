// Contexts (primary only), sticky errors and resets.
#include "engine_impl.hpp"

namespace aiocuda::cuda {

// Reset or broken: fail every await of the context and never touch its handles again.
void retire(CtxState* cs, CUresult code) {
    if (cs->retired) return;
    cs->retired = true;
    cs->error = code;
    for (Timeline* tl : eng->active) {
        if (tl->cs != cs) continue;
        for (Mark* m = tl->head; m; m = m->next) finish(m, code);
        if (tl->taken) finish(tl->taken, code);  // in stream order: before the newer open mark
        if (tl->open) finish(tl->open, code);
    }
    eng->to_watch.erase(std::remove_if(eng->to_watch.begin(), eng->to_watch.end(),
                                       [&](Mark* m) {
                                           if (m->tl->cs != cs) return false;
                                           unwatch(m);
                                           return true;
                                       }),
                        eng->to_watch.end());
    eng->placed_cv.notify_all();
}

// Whether `cs` is still the context instance it was made for; if not (a reset gave the context a
// new cuCtxGetId), retires it before any of its handles is touched. Takes eng->mu when retiring.
bool still_current(CtxState* cs) {
    unsigned long long id = 0;
    CUresult r = api.cuCtxGetId(cs->ctx, &id);
    if (r == CUDA_SUCCESS && id == cs->id) return true;
    Locked g;
    retire(cs, r != CUDA_SUCCESS ? r : CUDA_ERROR_CONTEXT_IS_DESTROYED);
    return false;
}

// ---- contexts ----------------------------------------------------------------------------------


// Device `device`'s primary context if it is active, retained once; null if it is not (retaining
// an inactive one would create it, which aiocuda never does as a side effect).
CUresult primary_of(int device, CUcontext* out) {
    {
        Locked g;
        if (static_cast<size_t>(device) < eng->primary.size() && eng->primary[device]) {
            *out = eng->primary[device];
            return CUDA_SUCCESS;
        }
    }
    unsigned flags = 0;
    int active = 0;
    CUdevice dev = 0;
    CUresult r = api.cuDeviceGet(&dev, device);
    if (r == CUDA_SUCCESS) r = api.cuDevicePrimaryCtxGetState(dev, &flags, &active);
    if (r != CUDA_SUCCESS || !active) {
        *out = nullptr;
        return r;
    }
    CUcontext p = nullptr;
    if ((r = api.cuDevicePrimaryCtxRetain(&p, dev)) != CUDA_SUCCESS) return r;
    Locked g;
    if (eng->primary.size() <= static_cast<size_t>(device)) eng->primary.resize(device + 1, nullptr);
    if (!eng->primary[device]) eng->primary[device] = p;  // a racing retain is one more reference
    *out = eng->primary[device];
    return CUDA_SUCCESS;
}

// Whether `r`, from a handle of device `device`'s primary context, says the context is inactive:
// a reset leaves it so until somebody retains it again (cuDevicePrimaryCtxReset "explicitly
// destroys and cleans up all resources"; aiocuda's own reference does not bring it back), and its
// handle then answers CUDA_ERROR_CONTEXT_IS_DESTROYED ("a primary context which has not yet been
// initialized"). Asked on that error only. Nothing can be queued on an inactive context.
bool primary_inactive(int device, CUresult r) {
    if (r != CUDA_ERROR_CONTEXT_IS_DESTROYED) return false;
    CUdevice dev = 0;
    unsigned flags = 0;
    int active = 1;
    return api.cuDeviceGet(&dev, device) == CUDA_SUCCESS &&
           api.cuDevicePrimaryCtxGetState(dev, &flags, &active) == CUDA_SUCCESS && !active;
}

CUresult check_device(int device, std::string* why) {
    int count = load().device_count;
    if (device >= 0 && device < count) return CUDA_SUCCESS;
    *why = "CUDA_ERROR_INVALID_DEVICE: no CUDA device " + std::to_string(device) + ": this machine has " +
           std::to_string(count) + " (valid ordinals are 0 to " + std::to_string(count - 1) + ")";
    return CUDA_ERROR_INVALID_DEVICE;
}

const char* const kNotPrimaryText =
    "the stream belongs to a CUDA context that is not a device's primary context; aiocuda "
    "supports primary contexts only (the ones PyTorch and TensorFlow use)";

// The state of context `ctx`, made on first use. A new cuCtxGetId means the context was reset:
// the old state is retired and its awaits fail. A broken context returns its sticky error.
CUresult ctx_state(CUcontext ctx, CtxState** out, std::string* why) {
    unsigned long long id = 0;
    CUresult r = api.cuCtxGetId(ctx, &id);
    if (r != CUDA_SUCCESS) return r;
    // Under eng->mu: the state of this instance of `ctx`, retiring those of earlier instances.
    auto known = [&](CUresult* res) -> bool {
        for (auto it = eng->ctxs.rbegin(); it != eng->ctxs.rend(); ++it) {
            CtxState* cs = *it;
            if (cs->ctx != ctx) continue;
            if (cs->id != id) {
                retire(cs, CUDA_ERROR_CONTEXT_IS_DESTROYED);
                continue;
            }
            *res = cs->retired ? cs->error : cs->primary ? CUDA_SUCCESS : kNotPrimary;
            if (*res == kNotPrimary) *why = kNotPrimaryText;
            *out = cs;
            return true;
        }
        return false;
    };
    {
        Locked g;
        if (known(&r)) return r;
    }
    auto cs = new CtxState;
    cs->ctx = ctx;
    cs->id = id;
    for (int d = 0; d < load().device_count && !cs->primary; ++d) {
        CUcontext p = nullptr;
        if (primary_of(d, &p) == CUDA_SUCCESS && p == ctx) {
            cs->primary = true;
            cs->device = d;
        }
    }
    Locked g;
    if (known(&r)) {  // another thread met it meanwhile: one state per context
        delete cs;
        return r;
    }
    eng->ctxs.push_back(cs);  // non-primary ones too, so that they are refused without a retain
    *out = cs;
    if (!cs->primary) {
        *why = kNotPrimaryText;
        return kNotPrimary;
    }
    return CUDA_SUCCESS;
}


// The context of `stream`. A legacy handle names no device: `device` says which, or else the
// current context. *cs == nullptr: the device has no active context, so nothing can be queued.
CUresult stream_ctx(uintptr_t stream, int device, CtxState** cs, std::string* why) {
    CUresult r;
    CUcontext ctx = nullptr;
    *cs = nullptr;
    if (device >= 0 && (r = check_device(device, why)) != CUDA_SUCCESS) return r;
    if (stream == kPerThreadHandle) {
        // It names the *calling* thread's default stream: aiocuda's threads would mark their own.
        *why = "stream handle 2 (CU_STREAM_PER_THREAD) names the calling thread's own default "
               "stream, which aiocuda cannot mark from its threads: await that stream's object "
               "(for example torch.cuda.current_stream()) or use the legacy stream (0)";
        return kPerThread;
    }
    if (!is_legacy(stream)) {
        if ((r = api.cuStreamGetCtx(reinterpret_cast<CUstream>(stream), &ctx)) != CUDA_SUCCESS)
            return r;
    } else if (device >= 0) {
        if ((r = primary_of(device, &ctx)) != CUDA_SUCCESS || !ctx) return r;
    } else {
        if ((r = api.cuCtxGetCurrent(&ctx)) != CUDA_SUCCESS) return r;
        if (!ctx) {
            *why = "stream handle " + std::to_string(stream) + " names the default stream of the "
                   "current CUDA context, and none is current on this thread: say which device "
                   "(for example aiocuda.synchronize(0, device=1))";
            return kNoContext;
        }
    }
    if ((r = ctx_state(ctx, cs, why)) != CUDA_SUCCESS) {
        if (is_legacy(stream) && device >= 0 && primary_inactive(device, r)) {
            *cs = nullptr;  // as when it has no context at all
            return CUDA_SUCCESS;
        }
        return r;
    }
    if (device >= 0 && (*cs)->device != device) {
        *why = "the stream belongs to CUDA device " + std::to_string((*cs)->device) +
               ", not device " + std::to_string(device) + " as device= says";
        *cs = nullptr;
        return kBadDevice;
    }
    return CUDA_SUCCESS;
}

}  // namespace aiocuda::cuda
