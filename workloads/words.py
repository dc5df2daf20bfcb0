"""Filler prompts of a given length in tokens, made of common English words.

The words are short and frequent, so byte-pair vocabularies (GPT-2, Llama, Qwen) almost always
hold each one, with its leading space, as a single token: N words come out close to N tokens.
The text is nonsense, but made of real words, so tokenizers see realistic input.
"""

from __future__ import annotations

import random

WORD_TEXT = """
    the of and to in is was for on that with as by at from his her they this be are it an
    not or have had one were all but which she their there been has when who will more no if
    out so said what up its about into than them can only other new some could time these two
    may then do first any my now such like our over man me even most made after also did many
    before must through back years where much your way well down should because each just those
    people how too little state good very make world still own see men work long get here between
    both life being under never day same another know while last might us great old year off come
    since against go came right used take three small house water light city place part land sea
    word line story night large point home hand high earth river tree field garden road window door
    table book letter paper music color voice morning summer winter wind rain stone bread horse bird
    """
# dict.fromkeys drops accidental repeats and keeps the order, so seeded prompts stay stable
WORDS: tuple[str, ...] = tuple(dict.fromkeys(WORD_TEXT.split()))


def filler_text(num_tokens: int, rng: random.Random) -> str:
    """About `num_tokens` tokens of words drawn from WORDS (at least one word)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, num_tokens)))
