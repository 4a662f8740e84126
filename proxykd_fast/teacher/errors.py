"""Classify a failed request: retry it, fail this unit (with a reason), or stop the whole run."""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import openai


class FatalAPIError(RuntimeError):
    """A failure that no retry can fix (bad key, unknown model, unreachable server): stop the run."""


class BadResponse(Exception):
    """A 2xx response that cannot be used (invalid JSON, no choices, empty content)."""


class NotAnAPI(BadResponse):
    """A 2xx response that is not JSON at all but a web page (HTML) or other text: the URL is not an API."""

    def __init__(self, content_type: str | None, text: str) -> None:
        super().__init__(f"not JSON but {content_type or 'text'}")
        self.content_type, self.text = content_type, text


_VERSION_SEGMENT = re.compile(r"^v\d+[a-z0-9]*$", re.IGNORECASE)


def base_url_hint(base_url: str) -> str:
    """A hint to add /v1 when `base_url` has no version segment in its path (e.g. http://host:8000)."""
    from urllib.parse import urlparse

    parsed = urlparse(base_url)
    if any(_VERSION_SEGMENT.match(seg) for seg in parsed.path.split("/")):
        return ""
    return (
        f"; the base URL has no /v1 in its path, and OpenAI-compatible servers serve the API under /v1: "
        f"try --base-url {base_url.rstrip('/')}/v1"
    )


def describe_non_api(status: int, content_type: str | None, text: str, url: str) -> str:
    """The message for a 2xx answer that is not JSON: what came back and where to look instead."""
    snippet = " ".join(text[:80].split())
    return (
        f"the teacher at {url} is not an OpenAI-compatible API: it answered {status} with "
        f"{content_type or 'no content type'} ({snippet!r}...) instead of JSON; check --base-url "
        f"(it must be the API's base URL, not a web page or a login proxy){base_url_hint(url)}"
    )


@dataclass
class Failure:
    """Why one attempt failed and whether another attempt may succeed.

    Kinds: "retry" (transient), "permanent" (this unit only), "fatal" (stop the run) and
    "stopped" (not retried because the run is stopping; the unit stays pending).
    `no_response` marks failures where nothing came back (timeouts, connection errors).
    """

    kind: Literal["retry", "permanent", "fatal", "stopped"]
    reason: str
    retry_after: float | None = None
    no_response: bool = False


def parse_retry_after(headers: Any) -> float | None:
    """Read Retry-After (seconds or HTTP date) or retry-after-ms from response headers."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(exc: openai.APIStatusError) -> str:
    """Pull the human-readable message out of an OpenAI-style error body."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return body["message"]
    return str(exc.message)


# Words in an unrecognised error's text that suggest another attempt may succeed.
TRANSIENT_HINTS = (
    "timeout",
    "timed out",
    "temporar",
    "unavailable",
    "overload",
    "connection",
    "reset",
    "try again",
    "retry",
    "rate limit",
    "busy",
    "capacity",
)


def looks_transient(text: str) -> bool:
    """True when an error text reads like a passing problem (timeouts, overload, resets)."""
    low = text.lower()
    return any(hint in low for hint in TRANSIENT_HINTS)


def _short(text: str, limit: int = 200) -> str:
    """One line of at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _classify_unknown(exc: BaseException) -> Failure:
    """An error we have no rule for: retry it if it looks transient, else fail this unit with its text."""
    name = type(exc).__name__
    detail = f"{name}: {exc}"
    body = getattr(exc, "body", None)
    if isinstance(body, (dict, str)) and str(body) not in detail:
        detail += f" {body}"
    if looks_transient(detail):
        return Failure("retry", f"unexpected error ({name})")
    return Failure("permanent", f"unexpected error ({_short(detail)})")


def classify(exc: BaseException, base_url: str, model: str, key_env: str) -> Failure:
    """Map an exception from one attempt to retry / permanent (this unit) / fatal (whole run); never raises."""
    if isinstance(exc, (asyncio.TimeoutError, openai.APITimeoutError)):
        return Failure("retry", "timeout", no_response=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = type(cause).__name__ if cause is not None else "connection failed"
        return Failure("retry", f"connection error ({detail})", no_response=True)
    if isinstance(exc, NotAnAPI):
        return Failure("retry", "bad response: not JSON (a web page?)")
    if isinstance(exc, BadResponse):
        return Failure("retry", f"bad response: {exc}")
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        msg = _error_message(exc)
        if code == 429 and getattr(exc, "code", None) == "insufficient_quota":
            return Failure("fatal", f"quota exhausted (429 insufficient_quota) at {base_url}: {msg}")
        if code == 429:
            return Failure("retry", "rate limited (429)", parse_retry_after(exc.response.headers))
        if code >= 500 or code in (408, 409):
            return Failure("retry", f"server error ({code})", parse_retry_after(exc.response.headers))
        if code in (401, 403):
            return Failure(
                "fatal",
                f"authentication failed ({code}) at {base_url}: {msg}. Set the API key in ${key_env}.",
            )
        if code == 404:
            hint = base_url_hint(base_url)
            if hint and getattr(exc, "code", None) != "model_not_found":
                return Failure("fatal", f"not found (404) at {base_url}: {msg}{hint}")
            return Failure("fatal", f"not found (404) at {base_url} for model {model!r}: {msg}")
        return Failure("permanent", f"request rejected ({code}): {msg}")
    return _classify_unknown(exc)
