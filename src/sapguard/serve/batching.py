"""Dynamic batching: a bounded queue in front of one worker thread that owns the model.

Chat requests are grouped into batches of up to ``max_batch_size`` requests of the same mode;
the first request of a batch waits at most ``max_wait_ms`` for company. Moderation requests are
batched the same way (counted in texts) and are also served *between decoding steps* of a
running chat batch, with the steering hook lifted for that moment, so a long generation does not
hold them up. Only the worker thread touches the model: hooks are never shared across threads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sapguard.detect import ScanItem, Verdict, scan
from sapguard.models.loading import LoadedModel
from sapguard.polytope.model import SafetyPolytope
from sapguard.serve.generation import ChatJob, Decoder, Failed
from sapguard.steer.hook import SteeringHook

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is at its bound; ``retry_after`` is a whole number of seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The scheduler no longer accepts work."""


@dataclass
class ModerationJob:
    """Texts or conversations to scan; ``responses`` for a reply moderated in the context of its prompt."""

    prompts: list[ScanItem]
    responses: list[str | None] | None
    done: Callable[[list[Verdict] | Failed], None]
    deadline: float
    arrival: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """The queue and the worker thread.

    Args:
        lm, poly: Model and polytope (used only from the worker thread).
        decoder: Runs chat batches.
        max_batch_size: Requests per chat batch; texts per moderation batch.
        max_wait_ms: How long a batch's first request waits for others.
        max_queue: Waiting requests beyond which :meth:`submit` raises :class:`QueueFull`.
        observe: Optional callback ``(kind, size, seconds)`` after each batch (metrics).
    """

    def __init__(
        self,
        lm: LoadedModel,
        poly: SafetyPolytope,
        decoder: Decoder,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        observe: Callable[[str, int, float], None] | None = None,
    ):
        self.lm = lm
        self.poly = poly
        self.decoder = decoder
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.observe = observe or (lambda kind, size, seconds: None)
        self._chat: deque[ChatJob] = deque()
        self._moderation: deque[ModerationJob] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._running = 0
        self._batch_seconds = 1.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="sapguard-worker", daemon=True)

    # -- public ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self._chat) + len(self._moderation)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, job: ChatJob | ModerationJob) -> None:
        """Queue a job, or raise :class:`QueueFull` / :class:`ShuttingDown`."""
        with self._cv:
            if self._closing:
                raise ShuttingDown
            if self.queued >= self.max_queue:
                waves = (self.queued + self._running) / self.max_batch_size + 1
                raise QueueFull(max(1, math.ceil(self._batch_seconds * waves)))
            if isinstance(job, ChatJob):
                self._chat.append(job)
            else:
                self._moderation.append(job)
            self._cv.notify()

    def close(self, timeout: float | None = None) -> None:
        """Finish queued and running work, then stop the worker."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._chat and not self._moderation:
                    if self._closing:
                        return
                    self._cv.wait()
            if self._moderation:
                self._fill(self._moderation, lambda: sum(len(j.prompts) for j in self._moderation))
                self._run_moderation()
                continue
            self._fill(self._chat, lambda: len(self._chat))
            jobs = self._take_chat()
            if not jobs:
                continue
            started = time.monotonic()
            self._running = len(jobs)
            try:
                self.decoder.run(jobs, between_steps=self._moderate_between_steps)
            except Exception as err:  # a bug or an out-of-memory must not take the server down
                logger.exception("chat batch of %d failed", len(jobs))
                for job in jobs:
                    if not job.done:
                        job.emit(Failed(500, f"generation failed: {type(err).__name__}"))
            finally:
                self._running = 0
            seconds = time.monotonic() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            self.observe("chat", len(jobs), seconds)

    def _fill(self, queue: deque[Any], size: Callable[[], int]) -> None:
        """Wait until the batch is full or its first job has waited ``max_wait``."""
        with self._cv:
            while queue and size() < self.max_batch_size and not self._closing:
                left = queue[0].arrival + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)

    def _take_chat(self) -> list[ChatJob]:
        """Up to ``max_batch_size`` live jobs in the mode of the oldest one, in arrival order."""
        jobs: list[ChatJob] = []
        with self._cv:
            rest: deque[ChatJob] = deque()
            mode = None
            while self._chat:
                job = self._chat.popleft()
                if job.cancelled.is_set():
                    continue
                if time.monotonic() > job.deadline:
                    job.emit(Failed(504, "the request timed out in the queue", "timeout"))
                    continue
                mode = mode or job.mode
                if job.mode == mode and len(jobs) < self.max_batch_size:
                    jobs.append(job)
                else:
                    rest.append(job)
            self._chat = rest
        return jobs

    def _take_moderation(self) -> list[ModerationJob]:
        jobs: list[ModerationJob] = []
        texts = 0
        with self._cv:
            while self._moderation and (not jobs or texts + len(self._moderation[0].prompts) <= self.max_batch_size):
                job = self._moderation.popleft()
                if job.cancelled.is_set():
                    continue
                if time.monotonic() > job.deadline:
                    job.done(Failed(504, "the request timed out in the queue", "timeout"))
                    continue
                jobs.append(job)
                texts += len(job.prompts)
        return jobs

    def _run_moderation(self) -> None:
        jobs = self._take_moderation()
        if not jobs:
            return
        started = time.monotonic()
        with_resp = [j for j in jobs if j.responses is not None]
        without = [j for j in jobs if j.responses is None]
        for group in (without, with_resp):
            if not group:
                continue
            prompts = [p for j in group for p in j.prompts]
            responses = [r for j in group for r in (j.responses or [])] if group is with_resp else None
            try:
                verdicts = scan(self.poly, prompts, lm=self.lm, responses=responses, batch_size=self.max_batch_size)
            except Exception as err:
                logger.exception("moderation batch of %d texts failed", len(prompts))
                for job in group:
                    job.done(Failed(500, f"moderation failed: {type(err).__name__}"))
                continue
            at = 0
            for job in group:
                job.done(verdicts[at:at + len(job.prompts)])
                at += len(job.prompts)
        self.observe("moderation", sum(len(j.prompts) for j in jobs), time.monotonic() - started)

    def _moderate_between_steps(self, hook: SteeringHook) -> None:
        """Serve waiting moderation requests between two decoding steps, with the hook lifted."""
        if not self._moderation:
            return
        hook.remove()
        try:
            self._run_moderation()  # one batch per step, so neither side starves
        finally:
            hook.install()
