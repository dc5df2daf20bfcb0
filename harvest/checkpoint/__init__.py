"""KV checkpoints: the handle that names one, the stores that hold them, the checkpointer that
saves a request's full blocks as they fill, and the loader that brings them back.

Only the handle is imported here: it travels in the queue's progress records, and the queue
must not pay for torch. The torch side is `harvest.checkpoint.store`, `.checkpointer` and
`.loader`.
"""

from harvest.checkpoint.handle import CheckpointHandle

__all__ = ["CheckpointHandle"]
