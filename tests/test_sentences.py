"""A framework error reply becomes the one clean sentence the store keeps (``server.sentences``)."""

from __future__ import annotations

import pytest

from server.sentences import error_sentence, one_line

RAY_TASK = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'"
            "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=18107, ip=192.0.2.2, actor_id=ab)\n"
            "  File \"/x/app.py\", line 3, in run\n    raise err\n"
            "flwr.clientapp.ClientAppException: \nException ClientAppException occurred. Message: "
            "ValueError: site-0: its records have 784 features'>")


@pytest.mark.parametrize(("reason", "expected"), [
    (RAY_TASK, "ValueError: site-0: its records have 784 features"),
    ("<class 'ray.exceptions.OutOfMemoryError'>:<'1 worker(s) were killed due to memory pressure (OOM)\nmore'>",
     "OutOfMemoryError: 1 worker(s) were killed due to memory pressure (OOM)"),
    ("Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'arrays'", "KeyError: 'arrays'"),
    ("just one line", "just one line"),
    (None, "the site replied with an error and no reason"),
])
def test_the_innermost_message_without_codes(reason: str | None, expected: str) -> None:
    got = error_sentence(reason)
    assert got == expected
    assert "\x1b" not in got and "\n" not in got


def test_one_line_strips_and_bounds() -> None:
    text = one_line("a\x1b[2Jb\r\nc\x07" + "x" * 1000, 50)
    assert len(text) == 50 and text.endswith("…") and all(ch.isprintable() for ch in text)
    assert text.startswith("ab c")
