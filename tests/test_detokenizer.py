"""Detokenizing output ids after their prompt: a SentencePiece-style (Metaspace) tokenizer
keeps the space that starts the first output word, as decoding prompt and output together
would."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from harvest.engine.detokenizer import Detokenizer, decode_output

WORDS = ["The", "capital", "of", "France", "is", "Paris", "and", "Lyon"]


@pytest.fixture(scope="module")
def metaspace():
    vocab = {"<unk>": 0, **{f"\u2581{w}": i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_output_keeps_its_leading_space_after_the_prompt(metaspace):
    prompt = metaspace.encode("The capital of France is")
    output = metaspace.encode("Paris and Lyon")
    assert metaspace.decode(output) == "Paris and Lyon"  # alone, the first space is lost
    after_prompt = metaspace.decode(prompt + output)[len(metaspace.decode(prompt)) :]
    assert decode_output(metaspace, prompt, output) == " Paris and Lyon" == after_prompt


def test_streamed_deltas_join_to_the_same_text(metaspace):
    prompt, output = metaspace.encode("The capital of France is"), metaspace.encode("Paris and Lyon")
    detok = Detokenizer(metaspace, prompt_ids=prompt)
    deltas = [detok.push(token) for token in output]
    deltas.append(detok.flush())
    assert deltas[0] == " Paris"
    assert "".join(deltas) == detok.text == decode_output(metaspace, prompt, output)


def test_stop_strings_are_found_in_the_output_only(metaspace):
    prompt, output = metaspace.encode("The capital is Paris"), metaspace.encode("and Paris is")
    detok = Detokenizer(metaspace, stop=["Paris"], prompt_ids=prompt)  # the prompt's "Paris" does not stop it
    text = ""
    for token in output:  # the engine ends the request at its stop string
        text += detok.push(token)
        if detok.stopped:
            break
    assert detok.stopped and text + detok.flush() == " and "
