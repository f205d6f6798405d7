"""Let Numba find TBB, so parallel kernels use its threading layer rather than OpenMP.

Numba tries tbb, then omp, then workqueue, but the tbb wheel installs libtbb into ``<prefix>/lib``, off the
loader's path, so Numba silently settles for OpenMP. Both cost ~1.4 µs per parallel region on an idle
machine, but OpenMP's end-of-region barrier spins on a thread that a busy machine has descheduled: on a
loaded 2-core host, batched scoring ran 5-7x slower under OpenMP than under TBB. Preloading the library is
all it takes; a user's NUMBA_THREADING_LAYER still decides.
"""

from __future__ import annotations

import ctypes
import os
import site
import sys
from pathlib import Path

_NAMES = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib"}


def preload_tbb() -> bool:
    """Load libtbb globally if the tbb wheel is installed; True when it is loaded."""
    name = _NAMES.get(sys.platform)
    if name is None or os.environ.get("NUMBA_THREADING_LAYER"):
        return False
    for base in (sys.prefix, sys.base_prefix, site.getuserbase()):
        lib = Path(base) / "lib" / name
        if lib.exists():
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                continue
    return False
