"""The stress suite's harnesses: shared by tests/test_stress.py (short runs) and scripts/stress
(long runs). The ones that need a process of their own run as ``python -m tests.stress.<name>``."""
