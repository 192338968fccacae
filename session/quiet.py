"""One library message silenced at Baton's entry points, and why.

bitsandbytes (0.50) on a CPU with AVX512-BF16 calls `from kernels import get_kernel` (Hugging
Face's `kernels`, which transformers 5.25 requires) at import, to fetch a faster 4-bit matmul
from the Hub ("kernels-community"). Offline, or where the kernel's publisher is not trusted, that
fails and bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." on
every CPU run, then uses its own CPU path, which is what Baton wants anyway (no Hub download in
the middle of a session). (Baton's own `kernels/` folder is imported as `baton.kernels` and never
stands in for HF's: docs/DESIGN.md, "Import names".)
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
