"""`triton` and `triton.language` for the kernel modules, or stand-ins when Triton is absent.

Triton is an optional third-party package: macOS, Windows, a bare CUDA box or a P100 image may
not have it, and there the plain-PyTorch references run. Every kernel module imports `triton`
and `tl` from here instead of importing Triton itself, so that each of them (references,
autograd Functions, the `@triton.jit` definitions) still imports without Triton. Only
launching a Triton kernel needs the real package; the stand-ins then raise
`TritonMissingError` with what to do. Our own modules are still imported without guards:
this file guards the one third-party package that is optional, nothing else.

`HAS_TRITON` is True when `import triton` succeeded here (not only when a `triton` folder is
on the path: a broken install counts as absent). Importing this module imports Triton, so it
is itself imported only by kernel modules, never by `kernels/__init__.py` or `dispatch.py`
(TRITON_INTERPRET must be settable before Triton is imported).
"""

from __future__ import annotations

from baton.kernels.errors import TritonMissingError


def _missing_message(what: str) -> str:
    return (f"{what} needs the triton package, which does not import here ({_REASON}); "
            "pip install triton (Linux, CUDA GPU of compute capability 7.5 or newer), or use "
            "the plain-PyTorch path: BATON_KERNELS=reference.")


class _MissingKernel:
    """What `@triton.jit` gives without Triton: a kernel that refuses to launch."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __getitem__(self, grid):
        raise TritonMissingError(_missing_message(f"the Triton kernel {self.__name__}"))

    def __call__(self, *args, **kwargs):
        raise TritonMissingError(_missing_message(f"the Triton kernel {self.__name__}"))


class _MissingModule:
    """Stand-in for `triton` / `triton.language`: `jit` and `constexpr` work, the rest refuses."""

    def __init__(self, name: str):
        self._name = name

    @staticmethod
    def jit(fn=None, **_options):
        if fn is None:  # @triton.jit(...) with options
            return _MissingKernel
        return _MissingKernel(fn)

    constexpr = object  # only ever read as an annotation

    def __getattr__(self, attr: str):
        raise TritonMissingError(_missing_message(f"{self._name}.{attr}"))


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _REASON = ""
except ImportError as exc:  # not installed, or an install that does not import
    triton = _MissingModule("triton")
    tl = _MissingModule("triton.language")
    HAS_TRITON = False
    _REASON = f"{type(exc).__name__}: {exc}"
