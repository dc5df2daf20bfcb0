"""Factory helpers shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

from harvest.engine import Engine, RequestOutput

PROMPT_LENGTHS = [1, 3, 7, 12, 20, 33, 47, 64, 5, 90]


def make_engine(model: Path, **kwargs) -> Engine:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("profile_latency", False)
    return Engine.from_pretrained(str(model), **kwargs)


def make_prompts(engine: Engine, lengths: list[int] = PROMPT_LENGTHS) -> list[list[int]]:
    """Token-id prompts of the given lengths, cut from the bundled corpus at different offsets."""
    from harvest.models.tiny import corpus_text

    ids = engine.tokenizer.encode(corpus_text())
    return [ids[7 * i : 7 * i + n] for i, n in enumerate(lengths)]


def run_checked(engine: Engine, max_steps: int = 5000) -> dict[str, RequestOutput]:
    """Step to completion, checking block-manager integrity after every step."""
    done: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.block_manager.check_integrity(engine.scheduler.unfinished())
    assert not engine.has_unfinished(), f"stuck after {max_steps} steps: {engine.scheduler.unfinished()}"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return done
