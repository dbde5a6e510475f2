"""One-line summaries of each pass over data, through the standard ``logging`` module.

Every pass (a fitting pass, the query gradients, a scoring pass) ends with one INFO record on the
``"fninfluence"`` logger, e.g.::

    fninfluence: ekfac covariance pass: 1500 examples in 0.41 s (3660 examples/s), peak memory 412 MiB (CPU RSS)

They are silent unless logging is configured, e.g. ``logging.basicConfig(level=logging.INFO)``; the
``fninfluence`` command line shows them. Progress bars are separate (tqdm, ``progress=False`` hides them).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Optional, Tuple

import torch

logger = logging.getLogger("fninfluence")

_MIB = 1024 * 1024


def peak_memory(device: Optional[torch.device] = None) -> Tuple[float, str]:
    """``(MiB, what)``: the peak memory so far of the process on ``device``.

    On CUDA, ``torch.cuda.max_memory_allocated`` (tensors only; peak statistics are not reset, so this is
    the peak since the process started or since the caller last reset them). Elsewhere, the peak resident
    set size of the process from ``getrusage`` (kilobytes on Linux, bytes on macOS).
    """
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MIB, "CUDA max allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return peak_bytes / _MIB, "CPU RSS"


def phase_summary(label: str, examples: int, seconds: float, device: Optional[torch.device] = None) -> str:
    """The one-line summary of a pass: its label, examples, wall time, throughput and peak memory."""
    memory, what = peak_memory(device)
    rate = f" ({examples / seconds:.0f} examples/s)" if seconds > 0 else ""
    return f"{label}: {examples} examples in {seconds:.2f} s{rate}, peak memory {memory:.0f} MiB ({what})"


def log_phase(label: str, examples: int, started: float, device: Optional[torch.device] = None, **fields) -> None:
    """Log :func:`phase_summary` at INFO for a pass that began at ``time.perf_counter() == started``.

    ``fields`` become attributes of the log record (``extra``), for handlers that collect timings
    (the benchmarks read ``phase``, ``seconds`` and ``finalize_seconds`` from the fitting passes)."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(phase_summary(label, examples, time.perf_counter() - started, device), extra=fields)
