"""MockEngine: an `EngineClient` with no model and no torch, for tests of the wiring around an engine.

Each request gets one token per step, chosen by a hash of the tokens before it, so outputs
are deterministic, the same for a request resumed from its tokens as for one never
interrupted, and known in advance (`expected_tokens`). The engine can be slowed
(`token_delay_s` per step), told to fail some requests alone (`fail_if`: they finish with
`FinishReason.ERROR`) or to die (`die()`: its next step raises and its thread ends, like an
`EngineLoop` whose engine failed). Like the loop, it runs on its own thread, takes every
change through its inbox and calls sinks on that thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from harvest.checkpoint.handle import CheckpointHandle
from harvest.protocol.engine_client import EngineLimits, EngineLoopError, ErrorSink, OutputSink
from harvest.protocol.sampling_params import SamplingParams
from harvest.protocol.types import FinishReason, RequestClass, RequestOutput, RequestState

WORDS = [f"w{i}" for i in range(64)]
SPECIAL = ["<unk>", "<eos>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the words w0..w63, unknown words as <unk>; decodes with spaces."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", chat_template=CHAT_TEMPLATE
    )


def next_token(token_ids: list[int]) -> int:
    """The mock's 'model': a word id from a hash of every token before it."""
    digest = hashlib.blake2b(str(token_ids).encode(), digest_size=4).digest()
    return len(SPECIAL) + int.from_bytes(digest, "little") % len(WORDS)


def expected_tokens(prompt_ids: list[int], max_tokens: int) -> list[int]:
    """What the mock generates for `prompt_ids` (no stop, no failure)."""
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        ids.append(next_token(ids))
    return ids[len(prompt_ids) :]


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    request_class: RequestClass
    on_output: OutputSink
    on_error: ErrorSink | None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""


class MockEngine:
    """See the module docstring. Implements `EngineClient` and the levers a worker pulls
    (`on_step`, `slo`, `error`, `stop`), as `EngineLoop` does."""

    def __init__(
        self,
        *,
        token_delay_s: float = 0.0,
        fail_if: Callable[[str], bool] | None = None,
        max_model_len: int = 256,
        num_blocks: int = 64,
        block_size: int = 16,
        max_num_seqs: int = 8,
        idle_tick_s: float = 0.01,
    ) -> None:
        self._tokenizer = make_tokenizer()
        self.limits = EngineLimits(max_model_len, num_blocks * block_size, max_num_seqs, block_size)
        self.token_delay_s = token_delay_s
        self.fail_if = fail_if or (lambda _request_id: False)
        self.idle_tick_s = idle_tick_s
        self.on_step: Callable[[list[RequestOutput]], None] | None = None
        self._slo = (1.0, 0.1)
        self._inbox: deque[Callable[[], None]] = deque()  # run on the engine's thread
        self._requests: dict[str, _Request] = {}  # the engine's thread's alone
        self._lock = threading.Lock()  # the ids submitted and not finished, seen from any thread
        self._pending: dict[str, RequestClass] = {}
        self._finished: Counter[str] = Counter()
        self._steps = 0
        self._die: BaseException | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mock-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ EngineClient

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self._tokenizer

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.OFFLINE,
        on_output: OutputSink | None = None,
        *,
        on_error: ErrorSink | None = None,
        stream_text: bool = False,
        priority: int = 0,  # the mock runs everything at once: no order to keep
    ) -> str:
        request_id = request_id or uuid.uuid4().hex
        ids = self._tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids or len(ids) + params.max_tokens > self.limits.max_request_tokens:
            raise ValueError(f"request {request_id!r} does not fit the mock's context")
        cls = RequestClass(request_class)
        req = _Request(request_id, ids, params, cls, on_output or (lambda _out: None), on_error)
        with self._lock:
            if not self.running:
                raise EngineLoopError("mock engine died" if self._error else "mock engine is stopped")
            if request_id in self._pending:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._pending[request_id] = cls
        self._send(lambda: self._requests.setdefault(request_id, req))
        return request_id

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.ONLINE,
        stream_text: bool = True,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def put(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        request_id = self.submit(prompt, params, request_id, request_class, put, on_error=put)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def resume(
        self, state: RequestState, on_output: OutputSink | None = None, *, on_error: ErrorSink | None = None
    ) -> str:
        params = SamplingParams(**state.params)
        return self.submit(
            state.token_ids, params, state.request_id, state.request_class, on_output, on_error=on_error
        )

    def resume_from_checkpoint(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        checkpoint: str,
        on_output: OutputSink | None = None,
        *,
        on_error: ErrorSink | None = None,
    ) -> str:
        # no KV here: starting over from the tokens is what an engine does with lost blocks
        return self.submit(token_ids, params, request_id, RequestClass.OFFLINE, on_output, on_error=on_error)

    def export(self, request_ids: list[str], timeout_s: float = 30.0) -> list[RequestState]:
        """As the engine's: each state names a checkpoint in store "mock" of the full blocks
        (there is no KV: resuming from it recomputes, as with a lost checkpoint)."""
        states: list[RequestState] = []
        done = threading.Event()

        def take() -> None:
            for request_id in request_ids:
                if (req := self._requests.pop(request_id, None)) is None:
                    continue
                with self._lock:
                    self._pending.pop(request_id, None)
                ids = req.prompt_ids + req.output_ids
                full = (len(ids) - 1) // self.limits.block_size * self.limits.block_size
                handle = CheckpointHandle("mock", request_id, full) if full else None
                states.append(RequestState(request_id, ids, len(req.prompt_ids), asdict(req.params),
                                           req.request_class.value, 0.0, handle))  # fmt: skip
            done.set()

        self._send(take)
        if not done.wait(timeout_s):
            raise EngineLoopError("the mock did not export in time")
        return states

    def abort(self, request_id: str) -> None:
        self._send(lambda: self._finish_now(request_id, FinishReason.ABORT))

    def set_slo(self, ttft_s: float, tpot_s: float) -> None:
        if ttft_s <= 0 or tpot_s <= 0:
            raise ValueError("SLO targets must be > 0")
        self._send(lambda: setattr(self, "_slo", (ttft_s, tpot_s)))

    def num_pending(self, request_class: RequestClass | str | None = None) -> int:
        with self._lock:
            if request_class is None:
                return len(self._pending)
            return sum(c is RequestClass(request_class) for c in self._pending.values())

    def healthy(self, max_stall_s: float = 30.0) -> bool:
        return self.running

    def stats(self, max_stall_s: float = 30.0) -> dict[str, Any]:
        with self._lock:
            pending = Counter(c.value for c in self._pending.values())
            finished = dict(self._finished)
        return {
            "running": self.running,
            "healthy": self.healthy(max_stall_s),
            "error": None if self._error is None else repr(self._error),
            "loop_steps": self._steps,
            "pending_online": pending[RequestClass.ONLINE.value],
            "pending_offline": pending[RequestClass.OFFLINE.value],
            "finished": finished,
        }

    # ------------------------------------------------------------------ the worker's levers

    @property
    def slo(self) -> tuple[float, float]:
        return self._slo

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def running(self) -> bool:
        return not self._stopping and self._thread.is_alive()

    def stop(self, timeout: float | None = 10.0) -> bool:
        self._stopping = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def die(self, error: BaseException | None = None) -> None:
        """Make the next step raise `error`, which ends the engine's thread."""
        self._die = error or RuntimeError("mock engine died")
        self._wake.set()

    # ------------------------------------------------------------------ the engine's thread

    def _send(self, command: Callable[[], None]) -> None:
        self._inbox.append(command)
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                while self._inbox:
                    self._inbox.popleft()()
                if self._die is not None:
                    raise self._die
                if not self._requests:
                    self._wake.wait(self.idle_tick_s)
                    if self.on_step is not None:
                        self.on_step([])
                    continue
                outputs = self._step()
                self._steps += 1
                if self.on_step is not None:
                    self.on_step(outputs)
                if self.token_delay_s:
                    self._wake.wait(self.token_delay_s)
        except BaseException as exc:
            self._error = exc
        finally:
            self._fail_pending()

    def _step(self) -> list[RequestOutput]:
        outputs = []
        for req in list(self._requests.values())[: self.limits.max_num_seqs]:
            if self.fail_if(req.request_id):
                outputs.append(self._finish_now(req.request_id, FinishReason.ERROR, "the mock failed it"))
                continue
            token = next_token(req.prompt_ids + req.output_ids)
            req.output_ids.append(token)
            done = len(req.output_ids) >= req.params.max_tokens
            outputs.append(self._output(req, [token], FinishReason.LENGTH if done else None))
            if done:
                self._end(req, FinishReason.LENGTH)
        return outputs

    def _finish_now(
        self, request_id: str, reason: FinishReason, error: str | None = None
    ) -> RequestOutput | None:
        req = self._requests.get(request_id)
        if req is None:
            return None
        out = self._output(req, [], reason, error)
        self._end(req, reason)
        return out

    def _output(
        self, req: _Request, new: list[int], reason: FinishReason | None, error: str | None = None
    ) -> RequestOutput:
        text = self._tokenizer.decode(req.output_ids)
        delta, req.text = text[len(req.text) :], text
        out = RequestOutput(
            request_id=req.request_id,
            new_token_ids=new,
            token_ids=list(req.output_ids),
            text=text,
            delta_text=delta,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=len(req.prompt_ids),
            num_output_tokens=len(req.output_ids),
            error=error,
            request_class=req.request_class,
        )
        req.on_output(out)
        return out

    def _end(self, req: _Request, reason: FinishReason) -> None:
        del self._requests[req.request_id]
        with self._lock:
            self._pending.pop(req.request_id, None)
            self._finished[reason.value] += 1

    def _fail_pending(self) -> None:
        with self._lock:
            self._stopping = True
            self._pending.clear()
        error = EngineLoopError("mock engine died" if self._error else "mock engine is stopped")
        for req in self._requests.values():
            if req.on_error is not None:
                req.on_error(error)
        self._requests.clear()
