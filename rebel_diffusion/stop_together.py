"""Every process of a multi-process run stops when one of them fails.

Without this, an error on one rank (a model that does not load there, a reward server that goes away) leaves the others
blocked in their next collective until it times out, or forever where nothing watches them. The failing process writes
its one-line error to the process group's key-value store; a watcher thread in every other process sees it within
`poll_s` seconds, prints a line naming the failed process and its error, and exits the process with status 1, even if
the main thread is blocked inside a collective. This works under any launcher (accelerate launch, torchrun, srun), as
it needs only the store that `torch.distributed` already runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

import torch.distributed as dist
from torch.distributed import distributed_c10d

FAILED_KEY = "rebel_diffusion/failed"
SEEN_KEY = "rebel_diffusion/failure_seen"


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _watch(store: dist.Store, rank: int, world_size: int, stop: threading.Event, poll_s: float) -> None:
    """Poll the store until the run ends; on another process's failure, say so and end this process."""
    try:
        while not stop.wait(poll_s):
            if store.check([FAILED_KEY]):
                message = store.get(FAILED_KEY).decode()
                store.add(SEEN_KEY, 1)
                print(f"error: {message}; process {rank} of {world_size} stops with it", file=sys.stderr, flush=True)
                os._exit(1)  # the main thread may be blocked in a collective that would never return
    except Exception:  # the store went away: the run is ending and the launcher reports how
        return


def _post_failure(store: dist.Store, message: str, world_size: int, wait_s: float) -> None:
    """Post this process's failure, unless a peer posted one first, and wait (at most `wait_s`) until every peer has
    seen it."""
    try:
        # Set only if no peer posted first (atomically: two may fail at once); else count as having seen theirs.
        if store.compare_set(FAILED_KEY, "", message).decode() != message:
            store.add(SEEN_KEY, 1)
        deadline = time.monotonic() + wait_s
        while store.add(SEEN_KEY, 0) < world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # the process that hosts the store has already exited: nobody is left to tell
        pass


@contextlib.contextmanager
def stop_together(poll_s: float = 0.5, wait_for_peers_s: float = 10.0) -> Iterator[None]:
    """Run the block so that an exception in it, on any process, stops every process of the run.

    On the failing process the exception propagates as usual, after the others have seen it (at most
    `wait_for_peers_s` seconds), so that every process reports before the launcher tears the job down; where several
    fail at once, each reports its own error. Does nothing in a single-process run.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    store = distributed_c10d._get_default_store()  # the rendezvous store every process already holds
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(store.clone(), rank, world_size, stop, poll_s), daemon=True)
    watcher.start()
    try:
        yield
    except Exception as error:
        stop.set()
        watcher.join()  # before this process's own failure is posted, which its watcher must not act on
        _post_failure(store, f"process {rank} failed: {_one_line(error)}", world_size, wait_for_peers_s)
        raise
    finally:
        stop.set()
        watcher.join()
