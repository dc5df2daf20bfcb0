"""EngineLoop: one engine stepping on a background thread, behind the `EngineClient` protocol.

The engine itself is single-threaded: only the loop thread calls `step()` or touches its
state. Requests, resumes and aborts go in through the engine's inbox (thread-safe), other
changes (the SLO targets) through the loop's own, applied between steps; the loop routes
each step's outputs to the request's sink: a plain callback (`submit`, for threads such
as the offline worker) or an asyncio queue fed with `call_soon_threadsafe` (`generate`,
for HTTP handlers and Ray async actors).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from harvest.checkpoint.handle import CheckpointHandle
from harvest.checkpoint.store import CheckpointStore
from harvest.engine import Engine, RequestClass, RequestOutput, RequestState, SamplingParams
from harvest.engine.config import SLOConfig
from harvest.engine.metrics import EngineStats, StepMetrics
from harvest.protocol.engine_client import EngineLimits, EngineLoopError
from harvest.protocol.engine_client import ErrorSink as ErrorCallback
from harvest.protocol.engine_client import OutputSink as OutputCallback

log = logging.getLogger(__name__)

StepHook = Callable[[list[RequestOutput]], None]


def _ignore(_: RequestOutput) -> None:
    pass


@dataclass(frozen=True)
class _Figures:
    """The engine's figures as the loop thread saw them after its last step: other threads
    (the heartbeat, /metrics, health checks) read these, never the engine.

    Cheap to take every step: `step` is the engine's own `StepMetrics` of that step (a new
    object each step, never changed after) and `totals` a shallow copy of its running totals'
    fields; the latency histograms in them are shared, as they take their own lock.
    """

    step: StepMetrics
    totals: dict[str, Any]  # EngineStats' fields
    kv_blocks_used: int
    has_work: bool  # requests in the engine, waiting or running

    @classmethod
    def of(cls, engine: Engine) -> _Figures:
        return cls(
            step=engine.last_step,
            totals=dict(vars(engine.stats)),
            kv_blocks_used=engine.block_manager.num_used_blocks,
            has_work=engine.has_unfinished(),
        )


@dataclass
class _Sink:
    request_class: RequestClass
    on_output: OutputCallback
    on_error: ErrorCallback | None


class EngineLoop:
    """Runs `engine.step()` continuously on a daemon thread started by the constructor; an
    `EngineClient` (harvest/protocol/engine_client.py).

    `on_step(outputs)` (optional) is called on the loop thread after every step with all of
    that step's outputs (step metrics; the offline worker's liveness tick); with
    `idle_tick_s` it is also called with `[]` that often while the engine is idle.

    `offline_yield` paces offline work while online traffic flows: within
    `online_window_s` of the engine's last online work, each offline-only step is followed
    by a pause of `offline_yield` x its own duration, cut short by any submission. This is
    for an engine that computes on the same cores as the serving path (the CPU device):
    there an offline step takes the CPU that the next online request needs on its way in.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        on_step: StepHook | None = None,
        idle_tick_s: float | None = None,
        offline_yield: float = 0.0,
        online_window_s: float = 1.0,
        name: str = "harvest-engine-loop",
    ) -> None:
        if offline_yield < 0 or online_window_s < 0:
            raise ValueError("offline_yield and online_window_s must be >= 0")
        self.engine = engine
        self.limits = EngineLimits(
            max_model_len=engine.max_model_len,
            capacity_tokens=engine.capacity_tokens,
            max_num_seqs=engine.config.scheduler.max_num_seqs,
            block_size=engine.block_manager.block_size,
        )
        self._tokenizer = engine.tokenizer
        self._figures = _Figures.of(engine)  # replaced by the loop thread after every step
        slo = engine.scheduler.config.slo
        self._slo = (slo.ttft_s, slo.tpot_s)  # as applied by the loop thread
        self._commands: deque[Callable[[], None]] = deque()  # run on the loop thread between steps
        self.on_step = on_step
        self.idle_tick_s = idle_tick_s
        self.offline_yield = offline_yield
        self.online_window_s = online_window_s
        self._online_seen = float("-inf")  # when the engine last had online work
        self._lock = threading.Lock()
        self._sinks: dict[str, _Sink] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._finished: Counter[str] = Counter()  # finish reason -> requests the engine finished
        self._steps = 0
        self.step_s = 0.0  # seconds inside engine.step()
        self._idle = False  # blocked on the wake event: a submission wakes it at once
        # last time the loop provably made progress: a completed step, or waking up idle
        self._progress_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.OFFLINE,
        on_output: OutputCallback | None = None,
        *,
        on_error: ErrorCallback | None = None,
        stream_text: bool = False,
        priority: int = 0,
    ) -> str:
        """Add a request from any thread; returns its id.

        `on_output` is called on the loop thread for each of the request's step outputs
        (the last has `.finished`; finish reason `error`, with `.error`, when the engine
        failed on this request alone); it must be quick and must not block. If the loop
        stops or dies first, `on_error` gets an `EngineLoopError`. Raises `EngineLoopError` when
        the loop is not running and `ValueError` for a request the engine refuses.
        """
        request_id = request_id or uuid.uuid4().hex
        self._add(
            request_id,
            _Sink(RequestClass(request_class), on_output or _ignore, on_error),
            lambda: self.engine.add_request(
                prompt,
                params,
                request_id=request_id,
                request_class=request_class,
                stream_text=stream_text,
                priority=priority,
            ),
        )
        return request_id

    def resume(
        self,
        state: RequestState,
        on_output: OutputCallback | None = None,
        *,
        on_error: ErrorCallback | None = None,
    ) -> str:
        """Continue a request exported from an engine sharing this one's checkpoint store; as `submit`."""
        sink = _Sink(RequestClass(state.request_class), on_output or _ignore, on_error)
        self._add(state.request_id, sink, lambda: self.engine.resume(state))
        return state.request_id

    def resume_from_checkpoint(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        checkpoint: CheckpointHandle,
        on_output: OutputCallback | None = None,
        *,
        on_error: ErrorCallback | None = None,
    ) -> str:
        """Continue an offline request from the checkpoint an earlier attempt reported
        (`RequestOutput.checkpoint`). The engine adopts and loads its blocks off the step (a
        LOADING request); a checkpoint that is gone costs a recompute, never a wait here."""
        state = RequestState(
            request_id=request_id,
            token_ids=list(token_ids),
            num_prompt_tokens=len(token_ids),
            params=asdict(params),
            request_class=RequestClass.OFFLINE.value,
            arrival_time=time.monotonic(),
            checkpoint=checkpoint,
        )
        return self.resume(state, on_output, on_error=on_error)

    def _add(self, request_id: str, sink: _Sink, add: Callable[[], object]) -> None:
        with self._lock:
            if not self.running:
                raise EngineLoopError(self._why_not_running())
            if request_id in self._sinks:
                raise ValueError(f"duplicate request id {request_id!r}")
            # registered before the engine sees the request, so no output can miss its sink
            self._sinks[request_id] = sink
        try:
            add()  # the engine's inbox: thread-safe
        except BaseException:
            with self._lock:
                self._sinks.pop(request_id, None)
            raise
        self._wake.set()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.ONLINE,
        stream_text: bool = True,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's step outputs; the last has `.finished`.

        Leaving early (the consumer is cancelled, or closes the iterator, e.g. on a client
        disconnect) aborts the request in the engine. Raises `EngineLoopError` if the loop
        is stopped or dies before the request finishes.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def put(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        request_id = self.submit(prompt, params, request_id, request_class, put, on_error=put,
                                 stream_text=stream_text, priority=priority)  # fmt: skip
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine no longer runs it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._detach(request_id)
                self.abort(request_id)

    def export(self, request_ids: list[str], timeout_s: float = 30.0) -> list[RequestState]:
        """Take requests out of the engine between two steps, each with its KV checkpoint
        (full blocks saved first); their sinks get nothing more. Requests that finished
        meanwhile are skipped. Raises `EngineLoopError` when the loop stops first."""
        states: list[RequestState] = []
        done = threading.Event()

        def take() -> None:
            for request_id in request_ids:
                if request_id not in self.engine.requests:
                    continue
                try:
                    states.append(self.engine.export(request_id))
                except Exception:  # a bug must not end the loop: the request stays in the engine
                    log.exception("could not export %s", request_id)
                    continue
                with self._lock:
                    self._sinks.pop(request_id, None)
            done.set()

        if not self.running:
            raise EngineLoopError(self._why_not_running())
        self._commands.append(take)
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        while not done.wait(0.05):  # the loop may die before it runs the command
            if not self.running:
                raise EngineLoopError(self._why_not_running())
            if time.monotonic() > deadline:
                raise EngineLoopError(f"export did not run within {timeout_s} s")
        return states

    def abort(self, request_id: str) -> None:
        """Abort from any thread; the request's sink still gets its final `abort` output."""
        self.engine.abort(request_id)
        self._wake.set()

    def _detach(self, request_id: str) -> None:
        """Drop a request's callbacks but keep it pending until the engine says it ended."""
        with self._lock:
            if (sink := self._sinks.get(request_id)) is not None:
                # its consumer is gone, and with it maybe the event loop the callbacks target
                sink.on_output, sink.on_error = _ignore, None

    def set_slo(self, ttft_s: float, tpot_s: float) -> None:
        """New latency targets for the scheduler, applied by the loop thread before its next
        step (the scheduler reads them mid-step). Raises `ValueError` for invalid ones."""
        SLOConfig(ttft_s=ttft_s, tpot_s=tpot_s)  # validate here, where the caller can hear it

        def apply() -> None:
            slo = self.engine.scheduler.config.slo
            slo.ttft_s, slo.tpot_s = ttft_s, tpot_s
            self._slo = (ttft_s, tpot_s)

        self._commands.append(apply)
        self._wake.set()

    @property
    def slo(self) -> tuple[float, float]:
        """The (TTFT, TPOT) targets the scheduler plans with now."""
        return self._slo

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def checkpoint_store(self) -> CheckpointStore:
        """Where the engine's KV checkpoints live (what a draining worker ships elsewhere)."""
        return self.engine.checkpoint_store

    def wake(self) -> None:
        """Make an idle loop look at the engine again."""
        self._wake.set()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                while self._commands:
                    self._commands.popleft()()
                # a submission after this check has set the event, so wait() returns at once
                if not self.engine.has_unfinished():
                    self._idle = True
                    woken = self._wake.wait(self.idle_tick_s)
                    self._progress_time = time.monotonic()
                    self._idle = False
                    if not woken and self.on_step is not None:
                        self._call_hook([])
                    continue
                started = time.monotonic()
                outputs = self.engine.step()
                self.step_s += time.monotonic() - started
                self._steps += 1
                self._figures = _Figures.of(self.engine)  # before routing: a finished request is counted
                self._route(outputs)
                if self.on_step is not None:
                    self._call_hook(outputs)
                self._progress_time = time.monotonic()
                self._pace(started)
        except BaseException as exc:
            # a request's own fault ends that request inside the engine (engine/fault.py):
            # what reaches here is the engine's, so the replica is unhealthy from now on
            self._error = exc
            log.exception("engine loop died")
        finally:
            self._fail_pending()

    def _pace(self, started: float) -> None:
        step, now = self.engine.last_step, time.monotonic()
        if step.online_tokens or step.online_running or step.online_waiting:
            self._online_seen = now
        elif self.offline_yield and step.offline_tokens and now - self._online_seen < self.online_window_s:
            self._wake.wait((now - started) * self.offline_yield)  # a submission wakes it at once

    def _route(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                if out.finished:
                    sink = self._sinks.pop(out.request_id, None)
                    self._finished[out.finish_reason.value if out.finish_reason else "unknown"] += 1
                else:
                    sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            try:
                sink.on_output(out)
            except Exception:
                # e.g. the consumer's event loop has closed: nobody listens any more
                log.warning("output callback of %s failed; aborting it", out.request_id, exc_info=True)
                with self._lock:
                    self._sinks.pop(out.request_id, None)
                if not out.finished:
                    self.engine.abort(out.request_id)

    def _call_hook(self, outputs: list[RequestOutput]) -> None:
        try:
            self.on_step(outputs)
        except Exception:
            # a failing hook (say, Redis down) must not take online serving down with it
            log.exception("engine loop on_step hook failed")

    def _fail_pending(self) -> None:
        with self._lock:
            self._stopping = True  # no new submissions from here on
            sinks, self._sinks = self._sinks, {}
        error = EngineLoopError(self._why_not_running())
        for request_id, sink in sinks.items():
            self.engine.abort(request_id)  # leave the engine clean for whoever steps it next
            if sink.on_error is not None:
                try:
                    sink.on_error(error)
                except Exception:
                    log.warning("error callback of %s failed", request_id, exc_info=True)

    # ------------------------------------------------------------------ lifecycle and health

    @property
    def running(self) -> bool:
        return not self._stopping and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """The exception that killed the loop thread, if any."""
        return self._error

    def _why_not_running(self) -> str:
        return f"engine loop died: {self._error!r}" if self._error else "engine loop is stopped"

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stop after the current step; pending requests get `EngineLoopError`.

        Returns False if the thread did not exit within `timeout` (a step that never ends).
        """
        self._stopping = True
        self._wake.set()
        if threading.current_thread() is self._thread:
            return False  # called from a callback: the loop exits when it returns
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def last_step_age_s(self) -> float:
        return time.monotonic() - self._progress_time

    def healthy(self, max_stall_s: float = 30.0) -> bool:
        """False if the thread is gone or dying, or it has work but no step finished for `max_stall_s`."""
        if self._error is not None or not self.running:
            return False
        # the age of an idle loop says nothing: it has been waiting, not stuck
        if self._idle or self.last_step_age_s() <= max_stall_s:
            return True
        return not (self.num_pending() or self._figures.has_work)

    def num_pending(self, request_class: RequestClass | str | None = None) -> int:
        """Requests submitted through the loop and not finished, of one class or all."""
        with self._lock:
            if request_class is None:
                return len(self._sinks)
            wanted = RequestClass(request_class)
            return sum(s.request_class is wanted for s in self._sinks.values())

    def stats(self, max_stall_s: float = 30.0) -> dict[str, Any]:
        """A JSON-friendly snapshot for the controller, health checks and /metrics; the engine's
        figures in it are those the loop thread published after its last step."""
        with self._lock:
            pending = Counter(s.request_class.value for s in self._sinks.values())
            finished = dict(self._finished)
        figures = self._figures
        return {
            "running": self.running,
            "healthy": self.healthy(max_stall_s),
            "error": None if self._error is None else self._why_not_running(),
            "loop_steps": self._steps,
            "last_step_age_s": self.last_step_age_s(),
            "pending_online": pending[RequestClass.ONLINE.value],
            "pending_offline": pending[RequestClass.OFFLINE.value],
            "finished": finished,
            "totals": EngineStats(**figures.totals).as_dict(),
            "last_step": figures.step.as_dict(),
            "kv_blocks_used": figures.kv_blocks_used,
            "kv_blocks_total": self.limits.capacity_tokens // self.limits.block_size,
        }
