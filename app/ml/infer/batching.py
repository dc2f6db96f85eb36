"""Cross-request micro-batching: concurrent requests on one base model share forwards.

One ``MicroBatcher`` per loaded base model replaces the lock that ran requests one after another.
Callers ``submit`` a unit of work (a few texts for one classifier = one adapter, one mode and
strategy) and wait on its future. A single thread per base model takes the oldest unit, waits up
to ``window_s`` for more to arrive (or until ``max_batch_texts`` are gathered), groups the units
that can share a forward (same ``group`` key: same adapter, mode, strategy) and runs each group
as one batch. Peft's active adapter is state of the shared model, so groups on different adapters
run one after the other, never mixed.

The queue is bounded (``max_pending`` units; 0 = unbounded, for the worker's evaluations): a
full queue refuses at once with ``QueueFullError`` instead of letting callers pile up and hang.
Results are those of running each unit alone, up to float rounding of the padded batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The base model's queue holds ``max_pending`` requests already: retry after ``retry_after`` seconds."""

    def __init__(self, pending: int, retry_after: int):
        super().__init__(f"{pending} requests are already waiting for this model; retry in {retry_after} s")
        self.pending, self.retry_after = pending, retry_after


@dataclass
class WorkUnit:
    """Texts that may share a forward with other units of the same ``group``.

    ``run(texts)`` computes results for the concatenated texts of a group (one per text, in order).
    """

    group: Hashable
    texts: list[str]
    run: Callable[[list[str]], list]
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, *, window_s: float = 0.002, max_batch_texts: int = 16, max_pending: int = 0,
                 retry_after_s: int = 1, name: str = "batcher"):
        if max_batch_texts < 1:
            raise ValueError("max_batch_texts must be >= 1")
        self.window_s = window_s
        self.max_batch_texts = max_batch_texts
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self._queue: queue.Queue[WorkUnit | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.batches_run = 0  # forwards (groups) run since start, for tests and stats
        self.largest_batch = 0

    def submit(self, group: Hashable, texts: list[str], run: Callable[[list[str]], list]) -> Future:
        """Queue ``texts``; the future's result is ``run``'s results for them (or its exception)."""
        with self._pending_lock:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            if self.max_pending and self._pending >= self.max_pending:
                raise QueueFullError(self._pending, retry_after=self.retry_after_s)
            self._pending += 1
        unit = WorkUnit(group, list(texts), run)
        self._queue.put(unit)
        return unit.future

    def run(self, group: Hashable, texts: list[str], run: Callable[[list[str]], list]) -> list:
        """``submit`` and wait for the results."""
        return self.submit(group, texts, run).result()

    def close(self) -> None:
        with self._pending_lock:
            self._closed = True
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    @property
    def pending(self) -> int:
        return self._pending

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            gathered = [first]
            texts = len(first.texts)
            deadline = time.perf_counter() + self.window_s
            stop = False
            while texts < self.max_batch_texts:
                timeout = deadline - time.perf_counter()
                try:
                    unit = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if unit is None:
                    stop = True
                    break
                gathered.append(unit)
                texts += len(unit.texts)
            # Groups in order of their first unit; a group is cut where it would pass max_batch_texts.
            groups: dict[Hashable, list[WorkUnit]] = {}
            for unit in gathered:
                groups.setdefault(unit.group, []).append(unit)
            for units in groups.values():
                batch: list[WorkUnit] = []
                for unit in units:
                    if batch and sum(len(u.texts) for u in batch) + len(unit.texts) > self.max_batch_texts:
                        self._run_group(batch)
                        batch = []
                    batch.append(unit)
                self._run_group(batch)
            if stop:
                break
        # Closed: whoever still waits gets an answer, not a hang.
        while True:
            try:
                unit = self._queue.get_nowait()
            except queue.Empty:
                break
            if unit is not None:
                unit.future.set_exception(RuntimeError("the model was unloaded"))

    def _run_group(self, units: list[WorkUnit]) -> None:
        texts = [t for unit in units for t in unit.texts]
        try:
            results = units[0].run(texts)
            if len(results) != len(texts):
                raise RuntimeError(f"{len(results)} results for {len(texts)} texts")
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for unit in units:
                unit.future.set_exception(exc)
        else:
            start = 0
            for unit in units:
                unit.future.set_result(results[start : start + len(unit.texts)])
                start += len(unit.texts)
        finally:
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(texts))
            with self._pending_lock:
                self._pending -= len(units)
