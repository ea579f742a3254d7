"""pytest-benchmark suite: `pytest bench --benchmark-enable` (see bench/test_completion.py).

Without a GPU the cuda path runs on the test-only driver emulator, built here as in tests/.
With AIOCUDA_TEST_REAL_DRIVER=1 (scripts/gpu-check) the real libcuda is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if os.environ.get("AIOCUDA_TEST_REAL_DRIVER") != "1":
    from tests.emu.build import build_emulator

    os.environ["AIOCUDA_LIBCUDA"] = str(build_emulator())
