"""Prompt upsampling through any OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`).

    from dalle3_jax.upsample import llm
    cfg = llm.LLMConfig(base_url="https://api.openai.com/v1", model="gpt-4o-mini",
                        api_key_env="OPENAI_API_KEY")
    upsampler = llm.LLMUpsampler(cfg)
    result = upsampler.upsample_one("two green stars")   # UpsampleResult(text=..., valid=True, ...)
    texts = upsampler.upsample(["a red circle", "three blue squares"])

The endpoint is asked, with a system prompt written for the shapes world and a few worked
examples, for exactly one description of 15-80 words. Only the standard library is used (urllib
and json), so the client adds no dependency and works against OpenAI, vLLM, llama.cpp's server,
Ollama and the like. The API key is read from the environment variable named by
`api_key_env` at request time; it is never stored in a config, a result or a log line.
`api_key_env=""` sends no Authorization header (local servers often need none).
"""

from __future__ import annotations

import dataclasses
import email.utils
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from dalle3_jax.data.world import vocab

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Where and how to ask. Times are in seconds."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name, never the key itself
    timeout_s: float = 60.0
    max_retries: int = 4  # extra attempts after the first, for timeouts, connection errors, 429 and 5xx
    backoff_s: float = 1.0  # first retry delay; doubles each retry
    backoff_max_s: float = 30.0  # cap on any delay, Retry-After included, so a run never stalls for long
    temperature: float = 0.7
    max_tokens: int = 256
    min_words: int = 15
    max_words: int = 80


@dataclasses.dataclass(frozen=True)
class UpsampleResult:
    prompt: str  # what the user wrote
    text: str  # the description (best effort when not valid)
    valid: bool  # word count within [min_words, max_words]
    words: int
    attempts: int  # completions asked for (a second one when the first had the wrong length)


class UpsampleError(RuntimeError):
    """The endpoint could not be used: configuration, transport or a malformed answer."""


class EndpointError(UpsampleError):
    """The endpoint answered with an HTTP error (status is None when it never answered)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _or(words) -> str:
    """'a, b or c': the closed vocabulary spelled out for the model."""
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# Built from the world's vocabulary so the prompt cannot drift from what the renderer can draw.
SYSTEM_PROMPT = (
    "You turn short image prompts into one detailed description for a text-to-image model. The model "
    "only knows a small synthetic world of flat shapes. Every image has a background that is "
    f"{_or(vocab.BACKGROUNDS)}, plain or a soft gradient, and one to four groups of identical "
    f"objects. A group has a count (one to four), a size ({_or(vocab.SIZES)}), a colour "
    f"({_or(vocab.COLOURS)}) and a shape ({_or(vocab.SHAPES)}); each object in it sits in its "
    f"own cell of a 3x3 grid: {', '.join(vocab.PLACES)}. No two objects share a cell.\n"
    "Keep everything the prompt states. Choose sensible values for whatever it leaves out, so that "
    "every group has its count, size, colour, shape and a place for each object, and the background "
    "is named. If the prompt asks for something this world cannot show, keep the nearest thing it can "
    "show and leave the rest out. Use the words above.\n"
    "Answer with exactly one description of 15 to 80 words in plain sentences and nothing else: no "
    "title, no quotation marks, no list, no alternatives, no comments."
)

# (short prompt, description) pairs sent as earlier chat turns: they show the length, the
# phrasing the captioners were trained on, filling in unstated facts, and mapping an
# out-of-world prompt onto shapes.
FEW_SHOTS: tuple[tuple[str, str], ...] = (
    ("a red circle",
     "There is a single large red circle in the center of the image, and nothing else. "
     "The background is plain white."),
    ("three blue squares",
     "Three small blue squares sit at the top left, the top and the top right of the image. "
     "The background is a soft gray gradient."),
    ("a pink diamond above two crosses",
     "A small pink diamond is at the top. Below it, two large purple crosses sit one at the bottom "
     "left and one at the bottom right. The background is black."),
    ("a sunset over the sea with a boat",
     "A large orange circle is at the top and a small blue triangle sits at the bottom. "
     "The background is a gentle beige gradient."),
)


def messages_for(prompt: str) -> list[dict[str, str]]:
    """The chat sent for one prompt: system prompt, the few-shot turns, then the user's prompt."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
    for short, long in FEW_SHOTS:
        msgs += [{"role": "user", "content": short}, {"role": "assistant", "content": long}]
    return msgs + [{"role": "user", "content": prompt}]


_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_LABEL = re.compile(r"^(description|prompt|answer)\s*:\s*", re.IGNORECASE)


def clean(text: str) -> str:
    """The first paragraph of a completion, without labels, wrapping quotes or extra whitespace."""
    text = text.strip()
    text = re.split(r"\n\s*\n", text, maxsplit=1)[0]
    # Quotes may wrap the label or sit after it: '"Description: ..."' and 'Description: "..."'.
    text = _LABEL.sub("", text.strip().strip(_QUOTES).strip()).strip().strip(_QUOTES).strip()
    return " ".join(text.split())  # one line: single newlines inside a paragraph become spaces


def word_count(text: str) -> int:
    return len(text.split())


def check_base_url(base_url: str) -> str:
    """The base URL without a trailing slash; a clear error for anything urllib cannot post to."""
    parts = urllib.parse.urlsplit(base_url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UpsampleError(f"bad base_url {base_url!r}: expected http(s)://host[:port][/path], "
                            "e.g. https://api.openai.com/v1")
    return base_url.rstrip("/")


def _server_message(body: bytes) -> str:
    """The error text a server sent: OpenAI's {"error": {"message": ...}} if present, else the body."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
    except (ValueError, AttributeError):
        pass
    return text[:500] or "(empty body)"


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
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


class LLMUpsampler:
    """A client for one OpenAI-compatible endpoint. `sleep` is injectable so tests need not wait."""

    def __init__(self, config: LLMConfig | None = None, sleep: Callable[[float], None] = time.sleep):
        self.config = config or LLMConfig()
        self.url = check_base_url(self.config.base_url) + "/chat/completions"
        self._sleep = sleep

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        name = self.config.api_key_env
        if name:
            key = os.environ.get(name)
            if not key:
                raise UpsampleError(f"the API key environment variable {name} is not set (or empty); "
                                    "export it, or set api_key_env='' for an endpoint that needs no key")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _delay(self, retry: int, retry_after: float | None) -> float:
        """Exponential backoff, at least the server's Retry-After, never above the cap."""
        delay = self.config.backoff_s * (2.0 ** retry)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.config.backoff_max_s)

    def _post(self, payload: dict) -> dict:
        """One chat completion, retried on timeouts, connection errors, 429 and 5xx."""
        body = json.dumps(payload).encode("utf-8")
        headers = self._headers()
        cfg = self.config
        for retry in range(cfg.max_retries + 1):
            last = retry == cfg.max_retries
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:  # before URLError: HTTPError is one
                message = _server_message(e.read())
                if not (e.code == 429 or e.code >= 500):
                    raise EndpointError(f"{self.url} answered HTTP {e.code}: {message}", e.code) from None
                if last:
                    raise EndpointError(f"{self.url} answered HTTP {e.code} after {retry + 1} attempts: "
                                        f"{message}", e.code) from None
                after = _retry_after_s(e.headers.get("Retry-After")) if e.code in (429, 503) else None
                what = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or e
                what = "timed out" if isinstance(reason, TimeoutError) else f"{type(reason).__name__}: {reason}"
                if last:
                    raise EndpointError(f"{self.url} failed after {retry + 1} attempts: {what} "
                                        f"(timeout_s={cfg.timeout_s})") from None
                after = None
            delay = self._delay(retry, after)
            log.warning("upsample: %s (%s); retry %d/%d in %.2fs", self.url, what, retry + 1,
                        cfg.max_retries, delay)
            self._sleep(delay)
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            raise UpsampleError(f"malformed response from {self.url}: not JSON: "
                                f"{raw[:200].decode('utf-8', errors='replace')!r}") from None

    def complete(self, prompt: str) -> str:
        """The raw text of one completion for a prompt (the assistant message's content)."""
        payload = {"model": self.config.model, "messages": messages_for(prompt),
                   "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        data = self._post(payload)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UpsampleError(f"malformed response from {self.url}: expected choices[0].message.content, "
                                f"got {json.dumps(data)[:300]}") from None
        if not isinstance(content, str):
            raise UpsampleError(f"malformed response from {self.url}: message content is "
                                f"{type(content).__name__}, not text")
        return content

    def _distance(self, words: int) -> int:
        """How far a word count is from the allowed range (0 inside it)."""
        return max(self.config.min_words - words, words - self.config.max_words, 0)

    def upsample_one(self, prompt: str) -> UpsampleResult:
        """One description; a second completion is asked for when the first has the wrong length."""
        best = None
        for attempt in (1, 2):
            text = clean(self.complete(prompt))
            words = word_count(text)
            if best is None or self._distance(words) < self._distance(best[1]):
                best = (text, words)
            if self._distance(words) == 0:
                break
        text, words = best
        valid = self._distance(words) == 0
        if not valid:
            log.warning("upsample: %r -> %d words after %d attempts (wanted %d-%d); keeping the closest",
                        prompt, words, attempt, self.config.min_words, self.config.max_words)
        return UpsampleResult(prompt=prompt, text=text, valid=valid, words=words, attempts=attempt)

    def upsample_results(self, prompts: list[str]) -> list[UpsampleResult]:
        """upsample_one for each prompt in order, with one progress line per prompt."""
        results, start = [], time.monotonic()
        for i, prompt in enumerate(prompts):
            r = self.upsample_one(prompt)
            results.append(r)
            log.info("upsample %d/%d (%.1fs): %r -> %d words%s", i + 1, len(prompts),
                     time.monotonic() - start, prompt, r.words, "" if r.valid else " (outside range)")
        return results

    def upsample(self, prompts: list[str]) -> list[str]:
        """The descriptions alone (best effort for any outside the word range; see the log)."""
        return [r.text for r in self.upsample_results(prompts)]


def upsample(prompts: list[str], config: LLMConfig | None = None) -> list[str]:
    """One-call form: LLMUpsampler(config).upsample(prompts)."""
    return LLMUpsampler(config).upsample(prompts)
