"""OpenAI-compatible teacher client with our own retry policy (backoff, jitter, Retry-After)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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

from .errors import (
    BadResponse,
    Failure,
    FatalAPIError,
    NotAnAPI,
    base_url_hint,
    classify,
    describe_non_api,
    parse_retry_after,
)

__all__ = [
    "BadResponse",
    "Completion",
    "Failure",
    "FatalAPIError",
    "IDEMPOTENCY_HEADER",
    "Outcome",
    "RequestIdentity",
    "RetryPolicy",
    "TeacherClient",
    "classify",
    "parse_body",
    "parse_retry_after",
]

Mode = Literal["chat", "completions"]
log = logging.getLogger(__name__)
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
IDEMPOTENCY_HEADER = "Idempotency-Key"  # draft-ietf-httpapi-idempotency-key-header; Stripe, some LLM gateways


@dataclass
class RequestIdentity:
    """Names the requests of one unit so that a server honouring `Idempotency-Key` bills them once.

    The key is a hash of `base` (run id, unit, request body) and `generation`. The generation
    stays the same while attempts get no answer at all (a timeout or dropped connection: the
    server may still be generating, and a repeat with the same key joins or replays that work)
    and moves on after any answer (an error or an unusable body), so a server that caches
    answers per key never hands a failed one back. `on_send(generation)` runs before every
    attempt; the collector journals it, so after a kill the resumed run repeats the same key.
    """

    base: str
    generation: int = 0
    on_send: Callable[[int], None] | None = None

    @property
    def key(self) -> str:
        """The Idempotency-Key header value for the current generation."""
        digest = hashlib.sha256(f"{self.base}:{self.generation}".encode()).hexdigest()
        return f"proxykd-{digest[:40]}"


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


def looks_like_a_page(text: str, content_type: str | None) -> bool:
    """True when a body that is not JSON is a web page or plain text rather than truncated JSON."""
    ctype = (content_type or "").lower()
    if "html" in ctype or "xml" in ctype or ctype.startswith("text/"):
        return True
    return text.lstrip()[:1] == "<"


def parse_body(text: str, mode: Mode, content_type: str | None = None) -> dict[str, Any]:
    """Parse and check a response body; raise BadResponse if it cannot give a completion.

    A body that is not JSON but a web page raises NotAnAPI (a BadResponse), which the client
    treats as fatal while no request has succeeded yet: the URL then points at no API at all.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if looks_like_a_page(text, content_type):
            raise NotAnAPI(content_type, text) from None
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
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise BadResponse("content holds a lone surrogate (not valid Unicode)") from None
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
        idempotency_key: bool = True,
    ) -> None:
        self.base_url = base_url
        self.idempotency_key = idempotency_key
        self.model = model
        self.mode = mode
        self.api_key_env = api_key_env
        self.policy = policy or RetryPolicy()
        self._rng = random.Random(rng_seed)
        self.answered = False  # has the server sent back anything at all (even an error)?
        self.succeeded = False  # has any request given a usable completion?
        self._logged_unexpected: set[str] = set()
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

    async def _attempt(self, prompt: Any, params: dict[str, Any], key: str | None = None) -> Completion:
        """Make one HTTP request and return a parsed completion (raises on any failure)."""
        extra = {"extra_headers": {IDEMPOTENCY_HEADER: key}} if key else {}
        if self.mode == "chat":
            call = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=prompt, **params, **extra
            )
        else:
            call = self._client.completions.with_raw_response.create(model=self.model, prompt=prompt, **params, **extra)
        raw = await asyncio.wait_for(call, timeout=self.policy.timeout)
        data = parse_body(raw.text, self.mode, raw.headers.get("content-type"))
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

    def _classify(self, exc: Exception) -> Failure:
        """Classify one failed attempt and remember whether the server answered at all."""
        failure = classify(exc, self.base_url, self.model, self.api_key_env)
        if not failure.no_response:
            self.answered = True
        if isinstance(exc, NotAnAPI) and not self.succeeded:
            # A web page before any good answer: the URL is wrong, and every retry would be too.
            return Failure("fatal", describe_non_api(200, exc.content_type, exc.text, self.base_url))
        name = type(exc).__name__
        if failure.reason.startswith("unexpected error") and name not in self._logged_unexpected:
            self._logged_unexpected.add(name)  # once per type: a systematic error must not flood the log
            log.warning("unexpected %s from the teacher client: %s", name, exc, exc_info=exc)
        return failure

    def _final(self, failure: Failure, attempts: int) -> Failure:
        """The failure to report once retries are used up; no answer ever from the server is fatal."""
        if failure.kind != "retry":
            return failure
        if failure.no_response and not self.answered:
            return Failure(
                "fatal",
                f"cannot reach the teacher at {self.base_url}: {failure.reason} after {attempts} attempts "
                "(it has not answered a single request; check --base-url and --timeout)",
            )
        return Failure("retry", f"{failure.reason} after {attempts} attempts")

    def _delay(self, failure: Failure, attempt: int) -> float:
        """Backoff before the next attempt: the server's Retry-After (capped) or exponential with jitter."""
        if failure.retry_after is not None:
            return min(self.policy.max_retry_after, failure.retry_after) + 0.1 * self._rng.random()
        return self.policy.backoff(attempt, self._rng)

    async def complete(
        self,
        prompt: Any,
        params: dict[str, Any],
        on_retry: Callable[[str, float], None] | None = None,
        on_resume: Callable[[], None] | None = None,
        stop: asyncio.Event | None = None,
        identity: RequestIdentity | None = None,
    ) -> Outcome:
        """Get one completion with up to `max_retries` retries; never raises for API failures.

        `on_retry(reason, delay)` is called before each backoff sleep and `on_resume()` after it.
        Once `stop` is set no new attempt starts (a backoff sleep ends at once) and the outcome
        is a "stopped" failure; an attempt already in flight runs to its end (at most `timeout`).
        With an `identity`, every attempt is announced to its `on_send` and, unless the client was
        made with `idempotency_key=False`, carries its Idempotency-Key (see RequestIdentity).
        """
        start = time.monotonic()
        reasons: list[str] = []
        attempt = 0
        while True:
            if stop is not None and stop.is_set():
                failure = Failure("stopped", "not sent: the run is stopping")
                return Outcome(None, failure, attempt, time.monotonic() - start, reasons)
            attempt += 1
            key = None
            if identity is not None:
                if identity.on_send is not None:
                    identity.on_send(identity.generation)
                key = identity.key if self.idempotency_key else None
            try:
                completion = await self._attempt(prompt, params, key)
                self.answered = self.succeeded = True
                return Outcome(completion, None, attempt, time.monotonic() - start, reasons)
            except Exception as exc:  # every failure is classified; none may crash the run
                failure = self._classify(exc)
            if identity is not None and not failure.no_response:
                identity.generation += 1  # the server answered this key: a new request needs a new one
            if failure.kind != "retry" or attempt > self.policy.max_retries:
                return Outcome(None, self._final(failure, attempt), attempt, time.monotonic() - start, reasons)
            if stop is not None and stop.is_set():
                continue  # no retry: the loop head reports the unit as stopped
            reasons.append(failure.reason)
            delay = self._delay(failure, attempt)
            if on_retry is not None:
                on_retry(failure.reason, delay)
            try:
                await _sleep(delay, stop)
            finally:
                if on_resume is not None:
                    on_resume()

    async def check_model(self) -> None:
        """Ask /models (with retries) so a wrong URL, key or model name fails before any billing.

        A 200 that is not JSON (a web page) is fatal at once; a 404 on a base URL without /v1
        is fatal too when {base}/v1/models answers, with that URL as the fix.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                raw = await asyncio.wait_for(self._client.models.with_raw_response.list(), timeout=self.policy.timeout)
                self.answered = True
                break
            except Exception as exc:
                if isinstance(exc, openai.NotFoundError):
                    self.answered = True
                    await self._check_v1_alternative()
                    return  # the server has no /models endpoint; the first request will tell
                failure = self._classify(exc)
            if failure.kind == "permanent":
                return  # /models is optional and this one is odd; the first request will tell
            if failure.kind == "fatal":
                raise FatalAPIError(failure.reason)
            if attempt > self.policy.max_retries:
                if failure.no_response and not self.answered:
                    raise FatalAPIError(
                        f"cannot reach the teacher at {self.base_url}: {failure.reason} after {attempt} attempts"
                    )
                raise FatalAPIError(
                    f"the teacher at {self.base_url} keeps failing on /models: {failure.reason} "
                    f"after {attempt} attempts"
                )
            await asyncio.sleep(self._delay(failure, attempt))
        ids = self._model_ids(raw.text, raw.headers.get("content-type"), raw.status_code)
        if ids and self.model not in ids:
            shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
            raise FatalAPIError(f"model {self.model!r} is not served at {self.base_url} (available: {shown})")

    def _model_ids(self, text: str, content_type: str | None, status: int) -> list[str]:
        """Model ids of a /models body; FatalAPIError when the body is not JSON (no API there)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise FatalAPIError(describe_non_api(status, content_type, text, self.base_url)) from None
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            log.warning("%s/models answered JSON that is not a model list; not checking the model name", self.base_url)
            return []
        return [str(m["id"]) for m in models if isinstance(m, dict) and "id" in m]

    async def _check_v1_alternative(self) -> None:
        """After a 404 on /models: if the base URL lacks /v1 and {base}/v1/models answers, say so (fatal)."""
        if not base_url_hint(self.base_url):
            return
        alternative = self.base_url.rstrip("/") + "/v1"
        try:
            raw = await asyncio.wait_for(
                self._client.with_options(base_url=alternative).models.with_raw_response.list(),
                timeout=self.policy.timeout,
            )
            json.loads(raw.text)
        except Exception:  # no API there either: the first request will tell
            return
        raise FatalAPIError(
            f"nothing answers at {self.base_url}/models (404), but {alternative}/models does: "
            f"use --base-url {alternative}"
        )


async def _sleep(delay: float, stop: asyncio.Event | None) -> None:
    """Sleep `delay` seconds, or less if `stop` gets set meanwhile."""
    if stop is None:
        await asyncio.sleep(delay)
        return
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay)
