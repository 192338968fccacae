"""The kernel layer's errors, in a module of their own so that `dispatch` and `_triton` can
both raise them without importing each other."""

from __future__ import annotations


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run here."""


class KernelChoiceError(KernelBackendError, ValueError):
    """`BATON_KERNELS` asks for what this machine cannot do: invalid input, not a crash.

    A ValueError, so that an entry point that maps invalid input to exit 2 maps this too; the
    message says what to set instead.
    """


class TritonMissingError(KernelBackendError):
    """A Triton kernel was launched, but the triton package does not import here."""
