"""aiocuda's benchmarks: ``python -m aiocuda.bench [--quick] [--out DIR]``.

Every comparison runs in one process and one run, on the stock asyncio loop and on uvloop:
aiocuda against ``run_in_executor``, ``asyncio.to_thread``, polling with ``sleep(0)`` and with a
1 ms sleep, a Python stream callback calling ``call_soon_threadsafe``, and the in-loop floor; on
a real GPU also against numba-cuda's ``async_done`` and CuPy (``synchronize`` in an executor,
and a host-function callback) where they are installed, each waiting on the same stream with
its own code. The report is a table (stdout and ``report.txt``), ``report.json`` and PNG plots.

A full report in steps (each well under 10 minutes), merged into one report in OUT:

  python -m aiocuda.bench --out OUT --source cpu
  python -m aiocuda.bench --out OUT --source cuda --loop asyncio --merge
  python -m aiocuda.bench --out OUT --source cuda --loop uvloop --merge

A step replaces the (source, loop) pairs it measures and leaves the others; the table and the
targets are computed over the whole report, which is saved after every measurement. Times on
a 2-core VM, the cuda rows on the driver emulator: cpu on both loops 95 s, cuda on one loop 76 s
(the whole report in one run: about 270 s; --quick: about 50 s). On a GPU add the numba-cuda
and CuPy rows (about a minute per loop, mostly their one Python callback per wait) and the
memory children's CUDA start-up (about 30 s per cuda step): about 3 minutes per cuda step.
--step-timeout bounds each measurement (120 s; 60 s is ample on a GPU).
"""
