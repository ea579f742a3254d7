"""A Ray Serve deployment that awaits its model through aiocuda, with requests batched per replica.

    python examples/ray_serve.py [--requests 48]

Needs: torch, ray.

The deployment is a class; its ``async def __call__`` awaits ``self.classify(x)``, a method
decorated with ``@aiocuda.batch`` (each replica gets its own batcher, like Ray Serve's
``@serve.batch``), whose body awaits one ``aiocuda.gpu_op`` for the whole batch: a CUDA stream on a
GPU replica, the cpu backend's workers without one. The replica's event loop stays free while the
model runs, so it keeps taking requests and the next batch gathers meanwhile.

Runs locally: a Ray instance of 2 CPUs with no dashboard, Serve without its HTTP proxy; requests
go through a deployment handle. Then ``serve.shutdown()`` and ``ray.shutdown()``.
"""

import argparse
import logging
import math
import time
from typing import Any

import ray
import torch
from ray import serve

import aiocuda

FEATURES, CLASSES = 32, 4


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128)
class Classifier:
    def __init__(self) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES),
        ).to(self.device).eval()

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # runs where gpu_op runs it: the loop thread or a cpu worker
            return self.model(x).argmax(dim=-1)

    @aiocuda.batch(max_batch_size=16, max_wait_s=0.005)
    async def classify(self, xs: list[torch.Tensor]) -> list[tuple[int, int]]:
        labels = await aiocuda.gpu_op(self.infer, torch.stack(xs))  # one call for the batch
        return [(label, len(xs)) for label in labels.tolist()]

    async def __call__(self, x: list[float]) -> dict[str, Any]:
        # Validated before it joins a batch: a batch fails as a whole, so one malformed request
        # would fail every request batched with it. This error reaches this caller only.
        if not (isinstance(x, list) and len(x) == FEATURES and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in x)):
            raise ValueError(f"x must be a list of {FEATURES} finite numbers")
        label, batch = await self.classify(torch.tensor(x, device=self.device))
        return {"label": label, "batch": batch, "device": self.device, "backends": aiocuda_backends()}


def aiocuda_backends() -> list[str]:
    # Not `aiocuda.backends()` in __call__: Ray pickles the class by value, and cloudpickle takes
    # a name `backends` in a function that uses the global `torch` for the module torch.backends,
    # which it cannot pickle.
    return list(aiocuda.backends())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    args = ap.parse_args()

    t0 = time.perf_counter()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's own Serve logs
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=True)
    try:
        serve.start(proxy_location="Disabled", logging_config={"log_level": "ERROR"})
        handle = serve.run(Classifier.bind(), name="classifier", route_prefix=None)
        started = time.perf_counter()
        print(f"ray {ray.__version__}: serve up in {started - t0:.1f} s")

        xs = [[((i * 7 + j) % 11 - 5) / 5 for j in range(FEATURES)] for i in range(args.requests)]
        t1 = time.perf_counter()
        responses = [handle.remote(x) for x in xs]  # all in flight at once
        replies = [r.result(timeout_s=60) for r in responses]
        wall = time.perf_counter() - t1
        assert all(0 <= r["label"] < CLASSES for r in replies), replies
        sizes = [r["batch"] for r in replies]
        print(f"{len(replies)} requests through a handle in {wall * 1e3:.0f} ms on "
              f"{replies[0]['device']} (aiocuda backends {replies[0]['backends']}); "
              f"batch sizes seen: largest {max(sizes)}, mean {sum(sizes) / len(sizes):.1f}")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
