"""Kill the whole job from any rank, even from a non-main thread.

MPI_Abort makes the launcher tear down every rank, so peers blocked in a collective do not
wait forever. Without MPI (a plain single process) we fall back to `os._exit`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import NoReturn

# MPICH's launcher may tear the job down before it has forwarded the last lines a rank
# wrote (seen: the whole stderr lost); a short pause lets the abort reason get out.
FLUSH_GRACE_S = 0.5


def _mpi_if_initialized():
    # Only use MPI if someone already imported and initialised it: importing it here
    # would start MPI in a process that never meant to use it.
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return None
    try:
        if mpi.Is_initialized() and not mpi.Is_finalized():
            return mpi
    except Exception:  # a broken MPI must not stop the abort
        return None
    return None


def world_rank() -> int:
    """This process's rank in MPI_COMM_WORLD, from MPI or the launcher's environment."""
    mpi = _mpi_if_initialized()
    if mpi is not None:
        return mpi.COMM_WORLD.Get_rank()
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def abort_job(msg: str, code: int = 1) -> NoReturn:
    """Write `msg` to stderr, then abort every rank of the job with exit status `code`."""
    # sys.__stderr__: callers (torch's excepthook wrapper) may have swapped sys.stderr
    # for a buffer they would only print after we return, which we never do.
    err = sys.__stderr__ or sys.stderr
    try:
        sys.stdout.flush()
        err.write(msg if msg.endswith("\n") else msg + "\n")
        err.flush()
    except Exception:
        pass
    mpi = _mpi_if_initialized()
    if mpi is not None:
        time.sleep(FLUSH_GRACE_S)
        mpi.COMM_WORLD.Abort(code)
    os._exit(code)
