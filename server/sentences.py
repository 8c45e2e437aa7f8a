"""A site's failure, as the one sentence the store keeps.

Veil sites answer what they cannot do as a refusal with a code and one line
(``client.app.answers_with_a_sentence``). What still arrives as a framework error (a site
running something else, a ClientApp that could not start, Ray's wrapping in simulation) is a
traceback with ANSI colour codes: this keeps its innermost exception message, without codes.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_EXCEPTION_LINE = re.compile(
    r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Refused|Interrupt)): (.+)$")
_MESSAGE_LINE = re.compile(r"Message:\s*(.+)$")
_RAY_WRAPPER = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)(?:\([^)]*\))?'>:<'(.*)$", re.DOTALL)
MAX_SENTENCE = 300


def one_line(text: str, limit: int = MAX_SENTENCE) -> str:
    """``text`` without ANSI codes or control characters, whitespace collapsed, at most ``limit`` characters."""
    text = _ANSI.sub("", text)
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error_sentence(reason: str | None) -> str:
    """The innermost exception message of a framework error reply, in one clean line."""
    if not reason:
        return "the site replied with an error and no reason"
    text = _ANSI.sub("", reason).rstrip()
    text = text[:-2] if text.endswith("'>") else text  # Ray's wrapper closes with '>
    lines = [ln.rstrip() for ln in text.splitlines()]
    found = None
    for ln in lines:
        if (m := _MESSAGE_LINE.search(ln)) and m.group(1).strip():
            found = m.group(1)
        elif (m := _EXCEPTION_LINE.match(ln)) and m.group(2).strip():
            found = f"{m.group(1)}: {m.group(2)}"
    if found is None:
        wrapped = _RAY_WRAPPER.match(_ANSI.sub("", reason).strip())
        if wrapped:  # Ray's "<class '...Error'>:<'message...'>" with no inner exception line
            found = f"{wrapped.group(1)}: {wrapped.group(2).splitlines()[0].rstrip(chr(39) + '> ')}"
        else:
            found = next((ln for ln in reversed(lines) if ln.strip()), reason)
    return one_line(found)
