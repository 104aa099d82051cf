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

_blocks = 0  # stop_together blocks entered by this process; the same on every rank, so each block has its own keys


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _wait_until_seen(store: dist.Store, seen_key: str, world_size: int, wait_s: float) -> None:
    """Wait (at most `wait_s`) until every process but the failed one has seen the failure: the process that hosts
    the store (rank 0 under env:// and srun) must not exit while a peer has yet to read it."""
    deadline = time.monotonic() + wait_s
    while store.add(seen_key, 0) < world_size - 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def _watch(store: dist.Store, keys: tuple[str, str], rank: int, world_size: int, stop: threading.Event, poll_s: float,
           wait_s: float) -> None:
    """Poll the store until the block ends; on another process's failure, say so and end this process."""
    failed_key, seen_key = keys
    try:
        while not stop.wait(poll_s):
            if store.check([failed_key]):
                message = store.get(failed_key).decode()
                print(f"error: {message}; process {rank} of {world_size} stops with it", file=sys.stderr, flush=True)
                store.add(seen_key, 1)
                _wait_until_seen(store, seen_key, world_size, wait_s)
                os._exit(1)  # the main thread may be blocked in a collective that would never return
    except Exception:  # the store went away: its host has exited, and the launcher or the timeout ends this one
        return


def _post_failure(store: dist.Store, keys: tuple[str, str], message: str, world_size: int, wait_s: float) -> None:
    """Post this process's failure, unless a peer posted one first, and wait until every peer has seen it."""
    failed_key, seen_key = keys
    try:
        # Set only if no peer posted first (atomically: two may fail at once); else count as having seen theirs.
        if store.compare_set(failed_key, "", message).decode() != message:
            store.add(seen_key, 1)
        _wait_until_seen(store, seen_key, world_size, wait_s)
    except Exception:  # the process that hosts the store has already exited: nobody is left to tell
        pass


@contextlib.contextmanager
def stop_together(poll_s: float = 0.5, wait_for_peers_s: float = 10.0) -> Iterator[None]:
    """Run the block so that an exception in it, on any process, stops every process of the run.

    On the failing process the exception propagates as usual, after the others have seen it, so that every process
    reports before the launcher tears the job down; where several fail at once, each reports its own error. The wait
    for peers is bounded by `wait_for_peers_s`: a peer that has not polled by then (its watcher thread starved of the
    GIL) is left to the launcher or to the collective timeout. Does nothing in a single-process run.
    """
    global _blocks
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    _blocks += 1
    keys = (f"rebel_diffusion/{_blocks}/failed", f"rebel_diffusion/{_blocks}/seen")
    # The key-value store every process already holds from the rendezvous; torch has no public accessor for it.
    store = distributed_c10d._get_default_store()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, daemon=True,
                               args=(store.clone(), keys, rank, world_size, stop, poll_s, wait_for_peers_s))
    watcher.start()
    try:
        yield
    except Exception as error:
        stop.set()
        watcher.join()  # before this process's own failure is posted, which its watcher must not act on
        _post_failure(store, keys, f"process {rank} failed: {_one_line(error)}", world_size, wait_for_peers_s)
        raise
    finally:
        stop.set()
        watcher.join()
