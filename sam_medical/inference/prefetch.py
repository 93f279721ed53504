"""Background encoding of the slices a user is likely to click next.

A :class:`Prefetcher` belongs to one :class:`~sam_medical.inference.predictor.VolumePredictor` (its
``owner``): it queues ``(prepared volume, slice k)`` jobs, and a daemon thread asks the owner to encode
them (:meth:`PrefetchOwner.encode_background`, which fills the owner's embedding cache). A new
:meth:`Prefetcher.submit` cancels the jobs still waiting from earlier calls (the user moved on). The
worker starts no encode while the owner serves a request (:attr:`PrefetchOwner.requests_active`), and
an encode a click stops (:class:`~sam_medical.inference.preemption.Preempted`) is tried again first,
once the requests are over.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sam_medical.inference.preemption import Preempted

if TYPE_CHECKING:
    from sam_medical.inference.volume_slices import PreparedVolume


def lowest_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux: its own nice value; elsewhere nothing), so
    that a core shared with a click, the server or anything else serves them first. Encodes run in
    this thread with one intra-op thread (PyTorch, ONNX Runtime); OpenVINO's own threads are not moved."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the priority stays
        pass


class PrefetchOwner(Protocol):
    """What a :class:`Prefetcher` needs from its predictor."""

    cache: Any  # supports ``key in cache``
    encode_batch: int
    requests_active: bool

    def cache_key(self, image_key: str, k: int) -> Hashable: ...

    def encode_background(self, prep: PreparedVolume, ks: Sequence[int]) -> int: ...


@dataclass
class PrefetchStats:
    """Counters of slices: queued, encoded, skipped (already cached or failed), dropped (no room),
    cancelled (superseded by a newer prefetch); and encodes stopped by a click (``preempted``: tried again)."""

    queued: int = 0
    encoded: int = 0
    skipped: int = 0
    dropped: int = 0
    cancelled: int = 0
    preempted: int = 0


@dataclass
class _Job:
    generation: int
    prepared: PreparedVolume
    k: int


class Prefetcher:
    """A bounded queue of slices to encode and the daemon thread that encodes them.

    Args:
        owner: the predictor whose cache is filled.
        queue_size: at most this many slices wait.
        threads: torch intra-op threads of the worker (the clicks keep the other cores).
        name: the worker thread's name.
    """

    def __init__(self, owner: PrefetchOwner, queue_size: int, threads: int, name: str) -> None:
        self.owner = owner
        self.threads = max(1, int(threads))
        self.name = name
        self.stats = PrefetchStats()
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max(1, int(queue_size)))
        self._retry: list[_Job] = []  # stopped by a click: taken before the queue (still unfinished tasks)
        self._generation = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._closed = False

    def submit(self, prep: PreparedVolume, ks: Iterable[int], room: int) -> int:
        """Queue slices ``ks`` of ``prep`` (nearest first; inside the volume and not cached), at most
        ``room`` of them, cancelling what earlier calls left waiting; return how many were queued."""
        if self._closed:
            return 0
        with self._lock:
            self._generation += 1
            gen = self._generation
        self._drop_pending()  # the user moved on: what earlier calls queued must not fill the queue
        self._ensure_worker()
        queued = 0
        depth = prep.shape[2]
        for k in ks:
            k = int(k)
            if not 0 <= k < depth or self.owner.cache_key(prep.image_key, k) in self.owner.cache:
                continue
            if queued >= room:  # within the cache budget: never evict what was just encoded
                self.stats.dropped += 1
                continue
            try:
                self._queue.put_nowait(_Job(gen, prep, k))
                queued += 1
            except queue.Full:
                self.stats.dropped += 1
        self.stats.queued += queued
        return queued

    def cancel(self) -> None:
        """Forget every slice still waiting to be encoded."""
        with self._lock:
            self._generation += 1
        self._drop_pending()

    def _drop_pending(self) -> None:
        with self._lock:
            retry, self._retry = self._retry, []
        for _ in retry:
            self.stats.cancelled += 1
            self._queue.task_done()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self.stats.cancelled += 1
            self._queue.task_done()

    def idle(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` seconds for the queue to drain; True when it is empty."""
        deadline = time.monotonic() + timeout
        while True:
            if self._queue.unfinished_tasks == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the worker for good (pending slices are dropped)."""
        self._closed = True
        self._stop.set()
        self.cancel()

    def describe(self) -> dict[str, int]:
        """The counters, plus ``pending`` (waiting) and ``in_flight`` (waiting or being encoded)."""
        s = self.stats
        return {
            "queued": s.queued,
            "encoded": s.encoded,
            "skipped": s.skipped,
            "dropped": s.dropped,
            "cancelled": s.cancelled,
            "preempted": s.preempted,
            "pending": self._queue.qsize(),
            "in_flight": self._queue.unfinished_tasks,
        }

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._stop.clear()
            self._worker = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._worker.start()

    def _next_jobs(self, first: _Job) -> list[_Job]:
        """``first`` and, when the engine batches (a GPU), more waiting jobs for the same volume."""
        jobs = [first]
        while len(jobs) < self.owner.encode_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            if job.prepared is not first.prepared:
                break
        return jobs

    def _live(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs neither superseded by a newer :meth:`submit` nor cached meanwhile."""
        live = []
        for job in jobs:
            if job.generation != self._generation:
                self.stats.cancelled += 1
            elif self.owner.cache_key(job.prepared.image_key, job.k) in self.owner.cache:
                self.stats.skipped += 1
            else:
                live.append(job)
        return live

    def _encode(self, live: list[_Job]) -> None:
        groups: dict[int, list[_Job]] = {}
        for job in live:
            groups.setdefault(id(job.prepared), []).append(job)
        for group in groups.values():
            encoded = self.owner.encode_background(group[0].prepared, [job.k for job in group])
            self.stats.encoded += encoded
            self.stats.skipped += len(group) - encoded

    def _take(self) -> _Job | None:
        """The next job: one a click stopped first, else the queue's (None after 0.5 s of nothing)."""
        with self._lock:
            if self._retry:
                return self._retry.pop(0)
        try:
            return self._queue.get(timeout=0.5)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        # intra-op threads are a per-thread setting (OpenMP): background encodes use few cores and
        # leave the others to the clicks
        torch.set_num_threads(self.threads)
        lowest_priority()
        while not self._stop.is_set():
            first = self._take()
            if first is None:
                continue
            jobs = self._next_jobs(first)
            finished = True
            try:
                live = self._live(jobs)
                if not live:
                    continue
                while self.owner.requests_active and not self._stop.is_set():
                    time.sleep(0.002)
                if self._stop.is_set():
                    break
                self._encode(live)
            except Preempted:  # a click needed the encoder: these slices go first next time
                self.stats.preempted += 1
                finished = not self._requeue(jobs)
                time.sleep(0.005)  # the click has the encoder: no busy loop while it runs
            except Exception:  # noqa: BLE001 - a background encode must never kill the worker
                self.stats.skipped += len(jobs)
            finally:
                if finished:
                    for _ in jobs:
                        self._queue.task_done()

    def _requeue(self, jobs: list[_Job]) -> bool:
        """Put stopped ``jobs`` first in line unless a newer submit superseded them; True when put back."""
        with self._lock:
            if self._stop.is_set() or any(job.generation != self._generation for job in jobs):
                return False
            self._retry[:0] = jobs
            return True
