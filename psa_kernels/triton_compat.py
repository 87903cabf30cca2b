"""Triton when it is installed, otherwise stand-ins that let the kernel modules import.

ComfyUI runs where Triton does not: Windows without ``triton-windows``, macOS, CPU-only
installs. The kernel modules define their ``@triton.jit`` kernels at import time, so without
Triton they would not import and the node pack would not load at all. With the stand-ins they
import, the torch reference works, and launching a kernel raises :class:`TritonUnavailable`
saying what to install. Callers that choose a path check :data:`HAVE_TRITON` first.
"""
from __future__ import annotations

INSTALL_HINT = ("install it in ComfyUI's Python environment: 'pip install triton-windows' on Windows "
                "(the version that matches your torch), 'pip install triton' on Linux")


class TritonUnavailable(RuntimeError):
    """A Triton kernel was launched in a Python environment without Triton."""


try:
    import triton
    import triton.language as tl
    MISSING_REASON: str | None = None
except ImportError as error:  # absent, or installed but broken (a build for another torch or Python)
    MISSING_REASON = ("Triton is not installed" if isinstance(error, ModuleNotFoundError)
                      else f"Triton is installed but does not import ({error})")

    class _KernelWithoutTriton:
        """What ``@triton.jit`` gives without Triton: the Python function, not launchable."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")
            self.__doc__ = getattr(fn, "__doc__", None)

        def _unavailable(self, *args, **kwargs):
            raise TritonUnavailable(f"{self.__name__} needs Triton: {MISSING_REASON}; {INSTALL_HINT}")

        __getitem__ = __call__ = _unavailable

    class _TritonStandIn:
        """The parts of ``triton`` that the kernel modules use outside kernel bodies."""

        @staticmethod
        def jit(fn=None, **options):
            if fn is None:
                return _KernelWithoutTriton
            return _KernelWithoutTriton(fn)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    class _LanguageStandIn:
        """``triton.language`` outside kernel bodies: constexpr wraps module-level constants."""

        @staticmethod
        def constexpr(value):
            return value

    triton = _TritonStandIn()
    tl = _LanguageStandIn()

HAVE_TRITON = MISSING_REASON is None


def missing_reason() -> str | None:
    """Why the Triton kernels cannot run here, in plain words, or None when they can."""
    return None if HAVE_TRITON else f"{MISSING_REASON}; {INSTALL_HINT}"


__all__ = ["HAVE_TRITON", "INSTALL_HINT", "TritonUnavailable", "missing_reason", "tl", "triton"]
