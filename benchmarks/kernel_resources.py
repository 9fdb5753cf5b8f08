"""Compile Triton kernels for sm_90 WITHOUT a GPU and report registers, spills and shared memory.

Costs no device time: Triton's bundled ptxas/cuobjdump do the work (``autodeploy.backends.triton.compile_check``,
which holds the cases: the kernels as their launchers configure them). Use it before a GPU run to catch code the
compiler refuses and register pressure (e.g. an epilogue that makes the whole kernel spill).
Usage: python benchmarks/kernel_resources.py [--cases "decode/*"] [--json out.json]
"""

from __future__ import annotations

import sys

from autodeploy.backends.triton.compile_check import main

if __name__ == "__main__":
    sys.exit(main())
