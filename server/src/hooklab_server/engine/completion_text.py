"""The text a generation adds, as stop strings and OpenAI-style completions see it: decoded after a
little of the prompt, special tokens skipped, spaces as the tokens spell them.

One definition for the engine (a row ends once its text holds a stop string) and the routes that
send that text (cut before the stop string, sent in pieces while it grows), so both agree on where
a stop string begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens decoded before the new ones: enough for a tokenizer that drops a word's leading
# space at the start of a decode (SentencePiece) to keep it after them.
CONTEXT_TOKENS = 4
_INCOMPLETE = "\ufffd"  # what a decode shows for the first bytes of an unfinished character
_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


def completion_text(tokenizer: Any, context: Sequence[int], new: Sequence[int]) -> str:
    """The text ``new`` adds after the prompt's last tokens ``context``: both decoded together,
    less the context's own text (the new tokens alone when that is not a prefix)."""
    if not new:
        return ""
    if context:
        before = str(tokenizer.decode(list(context), **_DECODE))
        whole = str(tokenizer.decode([*context, *new], **_DECODE))
        if whole.startswith(before) and not before.endswith(_INCOMPLETE):
            return whole[len(before) :]
    return str(tokenizer.decode(list(new), **_DECODE))


def token_text(tokenizer: Any, token: int) -> str:
    """One token decoded alone (part of a character shows as U+FFFD)."""
    return str(tokenizer.decode([token], **_DECODE))


def stop_position(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string in ``text`` begins (None: none there)."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def settled_length(text: str, stops: Sequence[str]) -> int:
    """How much of a growing ``text`` can be sent now: not an unfinished character at its end,
    nor an end that may yet become a stop string."""
    end = len(text.rstrip(_INCOMPLETE))
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), held, -1):
            if text[end - size : end] == stop[:size]:
                held = size
                break
    return end - held
