"""From a validated request body to engine inputs, off the event loop.

Both stages are shared with the offline path: `translate` (harvest.protocol.requests)
checks what does not depend on the model, `engine_inputs` (harvest.protocol.prepare)
tokenizes, applies the chat template and bounds the request by the context. The second
runs in a small thread pool: a multi-megabyte prompt takes seconds to tokenize, and on
the event loop that would stall every other request and /health with it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from transformers import PreTrainedTokenizerBase

from harvest.protocol.prepare import EngineInputs, engine_inputs
from harvest.protocol.requests import COMPLETIONS, Body, translate

__all__ = ["EngineInputs", "Tokenizing"]

# a few at once: each holds one prompt's text and ids, and tokenizing is CPU-bound
TOKENIZE_THREADS = 4


class Tokenizing:
    """The app's tokenizer pool: `await tokenizing(body, tokenizer, max_model_len)`.

    The pool starts on first use, in the process that serves, and is never pickled with
    an app that is shipped somewhere (threads do not travel).
    """

    def __init__(self, threads: int = TOKENIZE_THREADS) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:
        return {"threads": self.threads, "_pool": None}

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="harvest-tokenize")
        return self._pool

    async def __call__(
        self, body: Body, tokenizer: PreTrainedTokenizerBase, max_model_len: int
    ) -> EngineInputs:
        """InvalidRequest (answered as a 400) for a body the translator or the model refuses."""
        spec = translate(body)
        # like OpenAI, an unlimited chat completion may use whatever context is left
        default = 16 if spec.url == COMPLETIONS else None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, engine_inputs, spec, tokenizer, max_model_len, default)
