"""The generation queue: jobs run one at a time on the server's device, the others wait in order.

A job is a function `run(job)` submitted with an id. While it runs, the pipeline's `step_hook`
reports every sampler step to it (`Job.on_step`): the progress, the latest x0 prediction (decoded
into a preview only when a client asks for one) and the place where a cancel request stops the
sampler (`Cancelled` raised from inside the step). A queued job that is cancelled never starts.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

KEEP_FINISHED = 256  # finished jobs whose status can still be asked for


class Cancelled(Exception):
    """Raised inside a running job's sampler step when the job was cancelled."""


class QueueFull(Exception):
    """The queue holds as many jobs as it may."""


@dataclass(eq=False)
class Job:
    run: Callable[["Job"], Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"  # queued, running, done, failed, cancelled
    result: Any = None
    error: BaseException | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    batches: int = 1  # sampler runs the job makes (set by `run`)
    calls: int = 0  # sampler steps done, over all batches
    steps: int = 0  # sampler steps of one batch
    latent: Any = None  # the latest x0 prediction of the job's first image, [1, C, h, w]
    decode: Callable[[Any], Any] | None = None  # latent -> PIL image, for previews (set by `run`)
    cancel_requested: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    _preview: tuple = (None, None)  # (calls, PNG bytes) of the last decoded preview
    _preview_lock: threading.Lock = field(default_factory=threading.Lock)

    def on_step(self, step: int, steps: int, x0) -> None:
        """The pipeline's step hook: record progress, keep x0 for previews, stop when cancelled."""
        if self.cancel_requested:
            raise Cancelled(self.id)
        self.steps, self.calls = steps, self.calls + 1
        self.latent = x0[:1].detach()

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        total = self.steps * self.batches
        return min(1.0, self.calls / total) if total else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, from the time the steps done so far took."""
        if self.state != "running" or not self.calls or self.started is None:
            return None
        p = self.progress
        return (time.time() - self.started) * (1 - p) / p if p else None

    def preview_png(self) -> bytes | None:
        """The latest x0 prediction decoded as a PNG (None before the first step); decoded at most once
        per step, however many clients ask."""
        from io import BytesIO

        latent, calls = self.latent, self.calls
        if latent is None or self.decode is None:
            return None
        with self._preview_lock:
            if self._preview[0] != calls:
                buf = BytesIO()
                self.decode(latent).save(buf, format="PNG")
                self._preview = (calls, buf.getvalue())
            return self._preview[1]


class JobQueue:
    """Jobs in order, run by one worker thread (one device, one generation at a time)."""

    def __init__(self, max_queued: int = 64):
        self.max_queued = max_queued
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # every job not yet forgotten, by id
        self._cond = threading.Condition()
        self._current: Job | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="ldm-serve-worker", daemon=True)
        self._worker.start()

    def submit(self, run: Callable[[Job], Any], job_id: str | None = None) -> Job:
        job = Job(run) if job_id is None else Job(run, id=job_id)
        with self._cond:
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"{len(self._waiting)} jobs are waiting; at most {self.max_queued} may")
            if job.id in self._jobs and self._jobs[job.id].state in ("queued", "running"):
                raise ValueError(f"task id {job.id!r} is already in use")
            self._jobs[job.id] = job
            self._jobs.move_to_end(job.id)
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0: running (or finished); k: k jobs run before it."""
        with self._cond:
            if job.state != "queued":
                return 0
            ahead = list(self._waiting).index(job) if job in self._waiting else 0
            return ahead + (self._current is not None)

    @property
    def current(self) -> Job | None:
        return self._current

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def cancel(self, job: Job) -> None:
        """A queued job is dropped; a running one stops at its next sampler step."""
        with self._cond:
            job.cancel_requested = True
            if job.state == "queued" and job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled")

    def close(self) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._closed = True
            for job in list(self._waiting):
                self._finish(job, "cancelled")
            self._waiting.clear()
            if self._current is not None:
                self._current.cancel_requested = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.finished = state, time.time()
        job.done.set()
        finished = [k for k, j in self._jobs.items() if j.done.is_set()]
        for k in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[k]

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                job.state, job.started, self._current = "running", time.time(), job
            state = "done"
            try:
                job.result = job.run(job)
            except Cancelled:
                state = "cancelled"
            except BaseException as exc:  # noqa: BLE001 - the job's error goes back to its client
                job.error, state = exc, "failed"
            with self._cond:
                self._current = None
                self._finish(job, "cancelled" if job.cancel_requested and state != "done" else state)
