"""One library message silenced at Baton's entry points, and why.

bitsandbytes (0.50) on a CPU with AVX512-BF16 tries `from kernels import get_kernel` to fetch
a faster 4-bit matmul from the Hub ("kernels-community"). The name `kernels` is Baton's own
top-level package (the repository's layout keeps it), and it is found first because the
repository root leads sys.path; it has no `get_kernel`, so bitsandbytes logs "Failed to load
CPU gemm_4bit_forward from kernels-community ..." on every CPU run and falls back to its own
CPU path, which is what Baton wants anyway (no Hub download in the middle of a session).
The warning says nothing the person can act on, so exactly that record is dropped; every other
bitsandbytes message still shows.
"""

from __future__ import annotations

import logging

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class DropBnbKernelNotice(logging.Filter):
    """Drops the one bitsandbytes record described above, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_KERNEL_NOTICE)


def silence_bnb_kernel_notice() -> None:
    """Install the filter on bitsandbytes' CPU logger (before or after it is imported: the
    logger object is the same). Idempotent; called by agent.py and the scripts' main()."""
    logger = logging.getLogger(BNB_LOGGER)
    if not any(isinstance(f, DropBnbKernelNotice) for f in logger.filters):
        logger.addFilter(DropBnbKernelNotice())
