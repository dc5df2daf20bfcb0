"""What a request is, below every layer: request bodies, their translation, SamplingParams.

Torch-free and free of the HTTP and queue layers, so that the OpenAI routes, the batch
readers, `HarvestClient` and the offline worker all validate a request the same way.
"""

from harvest.protocol.errors import InvalidRequest
from harvest.protocol.requests import CHAT, COMPLETIONS, PromptSpec, parse_body, translate
from harvest.protocol.sampling_params import SamplingParams

__all__ = ["CHAT", "COMPLETIONS", "InvalidRequest", "PromptSpec", "SamplingParams", "parse_body", "translate"]
