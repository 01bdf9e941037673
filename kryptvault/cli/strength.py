"""Password strength, judged by zxcvbn (dictionaries, keyboard patterns, l33t, dates...).

zxcvbn works on Python `str`s and makes many more of them (lower-cased copies, slices),
none of which can be wiped. So it runs in a forked child that only ever sees a copy of the
password and exits right after; the parent keeps the password in its wipeable buffer and
gets back the score and zxcvbn's feedback, never the password.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kryptvault.crypto.secret import Secret
from kryptvault.errors import KryptvaultError

MIN_SCORE = 3  # zxcvbn: 3 = "safely unguessable: moderate protection from offline attacks"
MAX_SCORED_CHARS = 100  # zxcvbn slows down on long input; 100 characters are plenty to judge
USER_INPUTS = ["kryptvault", "vault", "token", "password", "usb"]
_MAX_REPLY = 64 * 1024


@dataclass(frozen=True)
class Verdict:
    score: int
    warning: str
    suggestions: list[str]


def judge(password: Secret) -> Verdict:
    import zxcvbn  # noqa: F401  (loaded before the fork: the child only computes)

    with password.view() as raw:
        copy = bytearray(raw)
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            _child(copy, w)
        os.close(w)
        w = -1
    finally:
        copy[:] = bytes(len(copy))
        if w >= 0:
            os.close(w)
    try:
        reply = bytearray()
        while len(reply) <= _MAX_REPLY:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            reply += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not reply:
        raise KryptvaultError("could not judge the password's strength (the zxcvbn check failed)")
    data = json.loads(reply)
    return Verdict(int(data["score"]), str(data["warning"]), [str(s) for s in data["suggestions"]])


def _child(copy: bytearray, w: int) -> None:  # pragma: no cover - runs in the child
    code = 1
    try:
        from zxcvbn import zxcvbn

        text = copy.decode("utf-8", errors="replace")[:MAX_SCORED_CHARS]
        result = zxcvbn(text, user_inputs=USER_INPUTS)
        feedback = result.get("feedback") or {}
        reply = json.dumps(
            {
                "score": result["score"],
                "warning": feedback.get("warning") or "",
                "suggestions": list(feedback.get("suggestions") or []),
            }
        ).encode()
        view = memoryview(reply)
        while view:
            view = view[os.write(w, view) :]
        code = 0
    finally:
        # No cleanup, no atexit handlers, no flushing of the parent's buffers.
        os._exit(code)


def weakness(verdict: Verdict) -> str | None:
    """Why the password is refused, in one line, or None when it is strong enough."""
    if verdict.score >= MIN_SCORE:
        return None
    reasons = [_sentence(verdict.warning)] if verdict.warning else []
    reasons += [_sentence(s) for s in verdict.suggestions[:2]]
    why = "; ".join(r for r in reasons if r) or "add another word or two; uncommon words are better"
    return f"the password is too easy to guess: {why}"


def _sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(".")
    return text[:1].lower() + text[1:]
