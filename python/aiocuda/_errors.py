"""aiocuda's exception hierarchy."""

from __future__ import annotations

import builtins
import copy

__all__ = ["AiocudaError", "CudaError"]

_GROUP: type[BaseException] | None = getattr(builtins, "BaseExceptionGroup", None)  # 3.11+


class AiocudaError(RuntimeError):
    """Base class of every error aiocuda raises."""


class CudaError(AiocudaError):
    """A CUDA driver call or the GPU work behind an await failed.

    ``code`` is the ``CUresult`` value and ``name`` its ``CUDA_ERROR_...`` name.
    """

    code: int
    name: str

    def __init__(self, code: int, message: str) -> None:
        if isinstance(code, bool) or not isinstance(code, int):
            raise TypeError(f"CudaError(code, message): code is an int CUresult, got "
                            f"{type(code).__name__}")
        if not isinstance(message, str):
            raise TypeError(f"CudaError(code, message): message is a str, got "
                            f"{type(message).__name__}")
        super().__init__(message)
        self.code = code
        head = message.split(":", 1)[0]
        self.name = head if head.startswith("CUDA_ERROR_") else f"CUDA_ERROR_{code}"

    def __reduce__(self) -> tuple[type[CudaError], tuple[int, str]]:
        return (type(self), (self.code, str(self)))


def faithful_copy(exc: BaseException) -> BaseException | None:
    """A copy of `exc` that raises as it does (its type, arguments and message; its cause,
    context and traceback; its notes, in a list of its own), for a second raiser whose traceback
    and notes must not land on the first's; None where a copy would differ (a class whose
    __init__ builds its message from other arguments: "code 7" -> "code code 7") or cannot be
    made (an exception group: its copies would share their leaves)."""
    if _GROUP is not None and isinstance(exc, _GROUP):
        return None
    try:
        dup = copy.copy(exc)  # type(exc)(*exc.args), then its __dict__
        for cls in type(exc).__mro__:  # and what its classes keep in __slots__
            slots = cls.__dict__.get("__slots__", ())
            for name in (slots,) if isinstance(slots, str) else slots:
                if name not in ("__dict__", "__weakref__") and hasattr(exc, name):
                    setattr(dup, name, getattr(exc, name))
        if type(dup) is not type(exc) or dup.args != exc.args or str(dup) != str(exc):
            return None
    except Exception:
        return None
    dup.__cause__, dup.__context__ = exc.__cause__, exc.__context__
    dup.__suppress_context__ = exc.__suppress_context__
    dup.__traceback__ = exc.__traceback__
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        setattr(dup, "__notes__", list(notes))  # (an attribute of BaseException from 3.11)
    return dup
