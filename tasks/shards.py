"""Independent shards of a data stage, run in this process or in forked worker processes: the local
counterpart of the flow's shard_map (Prefect tasks on a Dask cluster, flows/shards.py). A job is a small
picklable description, `fn(job, shared)` builds its shard (writing it atomically) and returns a small
record; the records come back in job order whatever the number of workers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

# Worker processes get the function and what every job shares once, at start.
_WORKER: tuple[Callable[[Any, Any], Any], Any] | None = None


def _init_worker(fn: Callable[[Any, Any], Any], shared: Any) -> None:
    global _WORKER
    _WORKER = (fn, shared)


def _run_in_worker(job: Any) -> Any:
    assert _WORKER is not None
    fn, shared = _WORKER
    return fn(job, shared)


def run_local(fn: Callable[[Any, Any], Any], jobs: list, shared: Any, num_proc: int,
              progress: Callable[[Iterable, int], Iterator] = lambda it, total: iter(it)) -> list:
    """[fn(job, shared) for job in jobs], in num_proc forked workers that each build one shard at a time
    (fork, not spawn: re-importing the stack per worker is slow, and the parent holds no tokenizer or
    thread pool that a fork would break)."""
    if num_proc <= 1 or len(jobs) <= 1:
        return [fn(job, shared) for job in progress(jobs, len(jobs))]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(num_proc, len(jobs)), mp_context=multiprocessing.get_context("fork"),
                             initializer=_init_worker, initargs=(fn, shared)) as pool:
        return list(progress(pool.map(_run_in_worker, jobs), len(jobs)))
