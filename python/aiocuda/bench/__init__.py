"""aiocuda's benchmarks: ``python -m aiocuda.bench [--quick] [--out DIR]``.

Every comparison runs in one process and one run, on the stock asyncio loop and on uvloop:
aiocuda against ``run_in_executor``, ``asyncio.to_thread``, polling with ``sleep(0)`` and with a
1 ms sleep, a Python stream callback calling ``call_soon_threadsafe``, and the in-loop floor.
The report is a table (stdout and ``report.txt``), ``report.json`` and PNG plots.
"""
