"""The limits of issue 12's yardstick (``benchmarks/structure.py``), asserted on the package's source."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.structure import measure  # noqa: E402

# The modules that import nothing back from the shell: the factors record, the stores, job arrays' cells
# and the version. TODO(issue 12, lead): tighten to "no import cycle at all" once the shell is rebuilt.
LOWER_LAYERS = ("fninfluence.factors", "fninfluence.store", "fninfluence.distributed", "fninfluence.partitions",
                "fninfluence.version")


def _in_lower_layers(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in LOWER_LAYERS)


def test_no_import_cycle_runs_through_the_factors_record_the_stores_or_job_arrays():
    """Imports inside functions count: a lazy import that hides a cycle at import time is still one."""
    cycles = [component for component in measure().import_cycles
              if any(_in_lower_layers(module) for module in component)]
    assert cycles == []
