"""OpenAI-compatible teacher client with our own retry policy (backoff, jitter, Retry-After)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import openai

Mode = Literal["chat", "completions"]
log = logging.getLogger(__name__)
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


class FatalAPIError(RuntimeError):
    """A failure that no retry can fix (bad key, unknown model, unreachable server): stop the run."""


class BadResponse(Exception):
    """A 2xx response that cannot be used (invalid JSON, no choices, empty content)."""


@dataclass
class RetryPolicy:
    """How often and how long to retry; `timeout` bounds one attempt in seconds."""

    max_retries: int = 6
    timeout: float = 60.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 60.0

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        """Exponential backoff with jitter in [d/2, d] for the `retry_number`-th retry (1-based)."""
        delay = min(self.backoff_max, self.backoff_base * (2 ** (retry_number - 1)))
        return delay * (0.5 + 0.5 * rng.random())


@dataclass
class Failure:
    """Why one attempt failed and whether another attempt may succeed."""

    kind: Literal["retry", "permanent", "fatal"]
    reason: str
    retry_after: float | None = None


@dataclass
class Completion:
    """A usable teacher answer parsed from the raw response."""

    text: str
    finish_reason: str | None
    usage: dict[str, int]
    response_id: str | None
    model: str | None
    request_id: str | None


@dataclass
class Outcome:
    """The end result for one unit: a completion, or the last failure, plus attempt count."""

    completion: Completion | None
    failure: Failure | None
    attempts: int
    latency_s: float
    retry_reasons: list[str]


def is_local_url(base_url: str) -> bool:
    """True when `base_url` points at this machine (where a missing key is expected)."""
    host = (urlparse(base_url).hostname or "").lower()
    return host in LOCAL_HOSTS or host.startswith("127.")


def resolve_api_key(env_var: str, base_url: str) -> str:
    """Read the API key from `env_var` (never a file); fall back to the dummy key "EMPTY"."""
    key = os.environ.get(env_var)
    if key:
        return key
    if not is_local_url(base_url):
        log.warning("$%s is not set; sending a dummy key to %s", env_var, base_url)
    return "EMPTY"


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


def classify(exc: BaseException, base_url: str, model: str, key_env: str) -> Failure:
    """Map an exception from one attempt to retry / permanent (this unit) / fatal (whole run)."""
    if isinstance(exc, (asyncio.TimeoutError, openai.APITimeoutError)):
        return Failure("retry", "timeout")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = type(cause).__name__ if cause is not None else "connection failed"
        return Failure("retry", f"connection error ({detail})")
    if isinstance(exc, BadResponse):
        return Failure("retry", f"bad response: {exc}")
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        msg = _error_message(exc)
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
            return Failure("fatal", f"not found (404) at {base_url} for model {model!r}: {msg}")
        return Failure("permanent", f"request rejected ({code}): {msg}")
    raise exc


def parse_body(text: str, mode: Mode) -> dict[str, Any]:
    """Parse and check a response body; raise BadResponse if it cannot give a completion."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadResponse(f"invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise BadResponse("body is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse("missing choices")
    choice = choices[0]
    if mode == "chat":
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
    else:
        content = choice.get("text")
    if not isinstance(content, str) or not content:
        raise BadResponse("empty content")
    return data


def _usage(data: dict[str, Any]) -> dict[str, int]:
    """Keep only the three standard usage counters, as ints (0 when absent)."""
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    out = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(key)
        out[key] = int(value) if isinstance(value, (int, float)) else 0
    return out


class TeacherClient:
    """Send one prompt at a time to an OpenAI-compatible server, retrying on our own terms."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        mode: Mode = "chat",
        api_key_env: str = "OPENAI_API_KEY",
        policy: RetryPolicy | None = None,
        rng_seed: int | None = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.mode = mode
        self.api_key_env = api_key_env
        self.policy = policy or RetryPolicy()
        self._rng = random.Random(rng_seed)
        self.retrying_now = 0  # units currently sleeping before their next attempt
        # The openai client must not retry: retries are ours, so they are counted and bounded.
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=resolve_api_key(api_key_env, base_url),
            max_retries=0,
            timeout=self.policy.timeout + 5.0,
        )

    async def close(self) -> None:
        """Close the underlying HTTP connections."""
        await self._client.close()

    async def _attempt(self, prompt: Any, params: dict[str, Any]) -> Completion:
        """Make one HTTP request and return a parsed completion (raises on any failure)."""
        if self.mode == "chat":
            call = self._client.chat.completions.with_raw_response.create(model=self.model, messages=prompt, **params)
        else:
            call = self._client.completions.with_raw_response.create(model=self.model, prompt=prompt, **params)
        raw = await asyncio.wait_for(call, timeout=self.policy.timeout)
        data = parse_body(raw.text, self.mode)
        choice = data["choices"][0]
        text = choice["message"]["content"] if self.mode == "chat" else choice["text"]
        return Completion(
            text=text,
            finish_reason=choice.get("finish_reason"),
            usage=_usage(data),
            response_id=data.get("id"),
            model=data.get("model"),
            request_id=raw.headers.get("x-request-id"),
        )

    async def complete(
        self,
        prompt: Any,
        params: dict[str, Any],
        on_retry: Callable[[str, float], None] | None = None,
    ) -> Outcome:
        """Get one completion with up to `max_retries` retries; never raises for API failures.

        `on_retry(reason, delay)` is called before each backoff sleep (for counting).
        """
        start = time.monotonic()
        reasons: list[str] = []
        attempt = 0
        while True:
            attempt += 1
            try:
                completion = await self._attempt(prompt, params)
                return Outcome(completion, None, attempt, time.monotonic() - start, reasons)
            except (asyncio.TimeoutError, openai.OpenAIError, BadResponse) as exc:
                failure = classify(exc, self.base_url, self.model, self.api_key_env)
            if failure.kind != "retry" or attempt > self.policy.max_retries:
                if failure.kind == "retry":
                    failure = Failure("retry", f"{failure.reason} after {attempt} attempts")
                return Outcome(None, failure, attempt, time.monotonic() - start, reasons)
            reasons.append(failure.reason)
            delay = self.policy.backoff(attempt, self._rng)
            if failure.retry_after is not None:
                delay = min(self.policy.max_retry_after, failure.retry_after) + 0.1 * self._rng.random()
            self.retrying_now += 1
            if on_retry is not None:
                on_retry(failure.reason, delay)
            try:
                await asyncio.sleep(delay)
            finally:
                self.retrying_now -= 1

    async def check_model(self) -> None:
        """Ask /models (with retries) so a wrong URL, key or model name fails before any billing."""
        attempt = 0
        while True:
            attempt += 1
            try:
                page = await asyncio.wait_for(self._client.models.list(), timeout=self.policy.timeout)
                break
            except (asyncio.TimeoutError, openai.OpenAIError) as exc:
                if isinstance(exc, openai.NotFoundError):
                    return  # the server has no /models endpoint; the first request will tell
                if (
                    isinstance(exc, openai.APIStatusError)
                    and exc.status_code not in (401, 403, 429)
                    and (exc.status_code < 500)
                ):
                    return
                failure = classify(exc, self.base_url, self.model, self.api_key_env)
            if failure.kind == "fatal":
                raise FatalAPIError(failure.reason)
            if attempt > self.policy.max_retries:
                raise FatalAPIError(
                    f"cannot reach the teacher at {self.base_url}: {failure.reason} after {attempt} attempts"
                )
            delay = self.policy.backoff(attempt, self._rng)
            if failure.retry_after is not None:
                delay = min(self.policy.max_retry_after, failure.retry_after)
            await asyncio.sleep(delay)
        ids = [m.id for m in getattr(page, "data", [])]
        if ids and self.model not in ids:
            shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
            raise FatalAPIError(f"model {self.model!r} is not served at {self.base_url} (available: {shown})")
