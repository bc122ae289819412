"""Each measurement of a speed benchmark runs in a fresh interpreter, as each DVC stage does.

A process whose heap has grown (an earlier measurement's activations, kept for reuse by
`keep_freed_memory`) shares all of it copy-on-write with every loader worker it forks, and
then faults on each page it writes while the worker lives. Measured after another in the
same process, `extract()` of 512 JPEGs from the image cache ran at 43 img/s; in a process
of its own, as `defuse extract` runs, at 64.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def _run(fn, args: tuple, keep_freed: bool):
    from pipeline.runtime import keep_freed_memory

    if keep_freed:
        keep_freed_memory()  # the allocator policy every defuse process runs with
    # A spawned child inherits "spawn" as its start method; its loader workers would then
    # import torch afresh instead of forking, as they do under `defuse`.
    multiprocessing.set_start_method("fork", force=True)
    return fn(*args)


def in_fresh_process(fn, *args, keep_freed: bool = True):
    """``fn(*args)`` in a newly spawned interpreter; its result (or its exception).
    ``keep_freed``: under defuse's allocator policy, else glibc's default one."""
    spawn = multiprocessing.get_context("spawn")  # fork would share this process's heap
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_run, fn, args, keep_freed).result()


def runner(smoke: bool):
    """`in_fresh_process`, or for a smoke run (which checks the code runs, not its speed) a
    plain call: each fresh interpreter costs seconds of imports."""
    return (lambda fn, *args, keep_freed=True: fn(*args)) if smoke else in_fresh_process
