"""Build a tiny, seeded causal LM and tokenizer locally, saved with `save_pretrained`.

Weights cannot be downloaded where harvest is tested, so tests and the demo make their
model here and load it back through the same `from_pretrained` path a real checkpoint
takes. `train_seconds > 0` fits it briefly to the bundled corpus so the demo prints
word-like text.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus_text() -> str:
    return resources.files("harvest.models").joinpath("data/corpus.txt").read_text()


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, max_len: int):
    # untied embeddings and a wider init than the default 0.02: a random model then emits
    # varied tokens with clear argmax margins, which makes greedy comparisons meaningful
    common = dict(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len, **common)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return config_cls(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),  # exercise grouped-query attention
        max_position_embeddings=max_len,
        **common,
    )


def make_tiny(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_len: int = 1024,
    seed: int = 0,
    train_seconds: float = 0.0,
) -> Path:
    """Write a tiny `arch` model and its tokenizer to `out_dir`; returns the directory."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = build_config(arch, len(tokenizer), hidden, layers, heads, max_len)
    model = AutoModelForCausalLM.from_config(config)
    if train_seconds > 0:
        _train(model, tokenizer, train_seconds, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _train(model, tokenizer, seconds: float, seed: int, seq_len: int = 64, batch: int = 16) -> None:
    """A minute of next-token training on the corpus: enough for word-like demo output."""
    ids = torch.tensor(tokenizer(corpus_text())["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
