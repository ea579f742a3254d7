"""aiocuda's exception hierarchy."""

from __future__ import annotations

__all__ = ["AiocudaError", "CudaError"]


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
