"""The `openai` judge: any OpenAI-compatible chat-completions endpoint, called over plain HTTP.

One request per pair (`max_tokens` 1, `logprobs` with the top 5), several in flight at once, retried
with exponential backoff on rate limits, server errors and dropped connections. Verdicts go to a disk
cache first, so a rerun (or a resumed run) pays only for pairs it has not judged. The API key is
read from an environment variable, sent only in the Authorization header, and never written to
annotations, metrics, cache or error messages.

alpaca_eval sends temperature 1 (the weighted preference reads log-probs, not the sampled token);
this judge sends 0 so that the discrete fallback, when a server returns no log-probs, is repeatable.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ...errors import UserError
from ..prompts import PROTOCOL, judge_messages
from .cache import JudgmentCache, judgment_key
from .protocol import choice_preference, is_switched, shown_order, unswitch

TOP_LOGPROBS = 5
_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _Retryable(Exception):
    pass


class _NoLogprobs(Exception):
    pass


def public_url(base_url: str) -> str:
    """The base URL without credentials or query, fit to record in metrics."""
    parts = urllib.parse.urlsplit(base_url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class OpenAIJudge:
    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", seed: int = 0,
                 concurrency: int = 4, max_retries: int = 5, timeout: float = 120.0, backoff: float = 1.0,
                 cache: JudgmentCache | None = None):
        self.model, self.seed = model, seed
        self.endpoint = base_url.rstrip("/") + "/chat/completions"
        self._api_key = os.environ.get(api_key_env) or None  # local servers need none
        self.concurrency, self.max_retries, self.timeout, self.backoff = concurrency, max_retries, timeout, backoff
        self.cache = cache or JudgmentCache(None)
        self.name = f"openai:{model}"
        self.judge_id = f"{self.name}|{PROTOCOL}|top_logprobs={TOP_LOGPROBS}|temperature=0"
        self.requests_made = 0
        self._want_logprobs = True
        self._lock = threading.Lock()

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode("utf-8"), headers=headers)
        with self._lock:
            self.requests_made += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            detail = self._scrub(error.read().decode("utf-8", "replace")[:300])
            if error.code in _RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {error.code}: {detail}") from None
            if error.code == 400 and body.get("logprobs"):
                raise _NoLogprobs(detail) from None
            raise UserError(f"The judge endpoint {public_url(self.endpoint)} refused the request (HTTP {error.code}): "
                            f"{detail}. Check --judge-base-url, --judge-model and the API key variable.") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as error:
            raise _Retryable(self._scrub(str(getattr(error, "reason", error)))) from None

    def _complete(self, messages: list[dict]) -> dict:
        """The first choice of one chat completion, retried with exponential backoff and jitter."""
        attempt = 0
        while True:
            body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0}
            if self._want_logprobs:
                body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
            try:
                return self._post(body)["choices"][0]
            except _NoLogprobs:
                # the server rejects log-probs: discrete verdicts from now on; not a failed attempt
                self._want_logprobs = False
            except (_Retryable, KeyError, IndexError) as error:
                if attempt == self.max_retries:
                    raise UserError(f"The judge endpoint {public_url(self.endpoint)} failed {attempt + 1} times; "
                                    f"last error: {error}. Is the server up and the model name right?") from None
                time.sleep(self.backoff * (2 ** attempt) * (1 + random.random()))
                attempt += 1

    def _judge_one(self, pair: dict) -> dict:
        switched = is_switched(pair["instruction"], self.seed)
        first, second = shown_order(pair["output_1"], pair["output_2"], switched)
        key = judgment_key(self.judge_id, pair["instruction"], first, second, switched)
        cached = self.cache.get(key)
        choice = cached["choice"] if cached else self._complete(judge_messages(pair["instruction"], first, second))
        if not cached:
            self.cache.put(key, {"choice": choice})
        shown_preference, mode = choice_preference(choice)
        return {"preference": unswitch(shown_preference, switched),
                "raw_completion": {**choice, "is_switched_outputs": switched, "parsed_from": mode,
                                   "from_cache": bool(cached)}}

    def judge(self, pairs: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(self._judge_one, pairs))
