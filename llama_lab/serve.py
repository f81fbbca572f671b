"""Serving a model over HTTP: the article's Flask `/predict`, done right, and an OpenAI-compatible API.

`create_app(model, tokenizer)` returns a Flask app with

* `POST /v1/chat/completions` and `POST /v1/completions`: the OpenAI wire format (the subset that
  matters: `model`, `messages` or `prompt`, `max_tokens`, `temperature`, `top_p`, `seed`, `stop`,
  `stream`), so the official `openai` client, and any tool built on it, talks to it unchanged;
  `stream: true` sends server-sent events ending with `data: [DONE]`;
* `POST /predict`: `{"text": ...}` in, the generated text and token counts out;
* `GET /v1/models` and `GET /health`.

Its defaults are the safe ones: every bad request gets a 4xx JSON error in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) that says what to fix, and never a traceback;
new tokens and request bodies are capped; one generation runs at a time, a few more wait, and
the rest are turned away with 503 and `Retry-After` instead of running the machine out of
memory; an optional API key is checked (in constant time) on every route but `/health`; an
optional `guard(text, role)` can refuse the input or the output. `llama-lab serve` runs it on
waitress, bound to 127.0.0.1.

>>> from llama_lab import load_model
>>> app = create_app(*load_model("tiny-random"), model_name="tiny-random")
>>> client = app.test_client()
>>> client.post("/predict", json={"text": "Hi", "max_tokens": 3}).get_json()["completion_tokens"]
3
>>> response = client.post("/predict", json={"txt": "Hi"})
>>> response.status_code, response.get_json()["error"]["param"]
(400, 'text')
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import flask
import torch
from werkzeug.exceptions import HTTPException

from llama_lab import sampling
from llama_lab.errors import InvalidSettingError

logger = logging.getLogger(__name__)

API_KEY_ENV = "LLAMA_LAB_API_KEY"
ROUTES = ("POST /v1/chat/completions", "POST /v1/completions", "POST /predict", "GET /v1/models",
          "GET /health")
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4  # as in OpenAI's API
WAITRESS_BODY_LIMIT = 16 * 2**20  # bodies above this get waitress' own (plain-text) 413

# guard(text, role) -> None to let the text through, or the reason to refuse it. role is "user"
# for what the client sent, "assistant" for what the model wrote.
Guard = Callable[[str, str], "str | None"]


@dataclass(frozen=True)
class Limits:
    """What one server accepts. Pass any of these to `create_app` as keywords."""

    max_tokens: int = 512  # the most new tokens a request may ask for
    default_max_tokens: int = 128  # when a request does not say (never above max_tokens)
    max_body_bytes: int = 64 * 1024  # request bodies above this get 413
    max_waiting: int = 4  # requests that may wait while one generates; more get 503
    wait_timeout_s: float = 60.0  # a waiting request gives up after this long (503)
    retry_after_s: int = 2  # what a 503 tells the client to wait before trying again

    def __post_init__(self):
        if self.max_tokens < 1 or self.default_max_tokens < 1:
            raise InvalidSettingError("max_tokens and default_max_tokens must be >= 1 "
                                      f"(got {self.max_tokens}, {self.default_max_tokens}).")
        if self.max_body_bytes < 1 or self.max_waiting < 0 or self.wait_timeout_s < 0:
            raise InvalidSettingError(
                "max_body_bytes must be >= 1, max_waiting and wait_timeout_s >= 0 "
                f"(got {self.max_body_bytes}, {self.max_waiting}, {self.wait_timeout_s}).")


class APIError(Exception):
    """An answer other than 200, sent as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> flask.Response:
        response = flask.jsonify(self.body())
        response.status_code = self.status
        response.headers.update(self.headers)
        return response


# --- one generation at a time -------------------------------------------------------------------

class Gate:
    """One generation on the model at a time, at most `max_waiting` more in line; the others
    are turned away at once (503), and so is a request that waited `wait_timeout_s` in vain.

    Many generations at once would each hold activations and a KV cache: on a GPU that is how
    a server runs out of memory. A queue without a bound only turns that into unbounded
    latency. (Batching many sequences in one forward pass is what vLLM and TGI do instead.)
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self._line = threading.BoundedSemaphore(limits.max_waiting + 1)  # the one running + those waiting
        self._model = threading.Lock()
        self._count_lock = threading.Lock()
        self.admitted = self.running = 0

    def enter(self) -> None:
        """Take the model, or raise the 503 `APIError`."""
        if not self._line.acquire(blocking=False):
            raise self._busy(f"{self.limits.max_waiting + 1} requests are already running or waiting")
        self._count(admitted=1)
        if not self._model.acquire(timeout=self.limits.wait_timeout_s):
            self._count(admitted=-1)
            self._line.release()
            raise self._busy(f"this request waited {self.limits.wait_timeout_s:g} s for the model")
        self._count(running=1)

    def leave(self) -> None:
        self._count(admitted=-1, running=-1)
        self._model.release()
        self._line.release()

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def _count(self, admitted: int = 0, running: int = 0) -> None:
        with self._count_lock:
            self.admitted += admitted
            self.running += running

    def _busy(self, why: str) -> APIError:
        return APIError(503, f"The server is busy: {why}. Retry after {self.limits.retry_after_s} s.",
                        kind="server_error", code="server_busy",
                        headers={"Retry-After": str(self.limits.retry_after_s)})


# --- checking a request -------------------------------------------------------------------------

_KINDS = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
          "object": dict}


def _field(body: dict, name: str, kind: str, default: Any = None, required: bool = False) -> Any:
    """body[name] if it has the JSON type `kind`, the default if absent (or null), else a 400."""
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(400, f"Missing '{name}': send a JSON object with a '{name}' field.", param=name,
                           code="missing_field")
        return default
    wrong_bool = isinstance(value, bool) and kind != "boolean"  # JSON true is not a number
    if wrong_bool or not isinstance(value, _KINDS[kind]):
        raise APIError(400, f"'{name}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, "
                            f"not {type(value).__name__} {value!r:.40}.", param=name, code="invalid_type")
    return value


def read_body(request: flask.Request) -> dict:
    """The request's JSON object, or a 4xx saying what is wrong with the body."""
    if request.mimetype != "application/json":
        # Also a safety rule: a web page can send a form or text/plain to 127.0.0.1 without the
        # browser asking first; a JSON body needs the server's consent (a CORS preflight).
        raise APIError(415, f"The body must be JSON with 'Content-Type: application/json' (got "
                            f"{request.mimetype or 'no Content-Type'!r}).", code="unsupported_media_type")
    raw = request.get_data(cache=False)  # over the size cap: werkzeug raises 413 here
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"The body is not valid JSON ({err}). Send an object such as "
                            '{"text": "Hello"}.', code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The body must be a JSON object ({{...}}), not {type(body).__name__}.",
                       code="invalid_json")
    return body


@dataclass
class GenerationRequest:
    """What a valid request asks the model for."""

    input_ids: torch.Tensor  # (1, prompt tokens)
    max_tokens: int
    settings: dict  # do_sample, temperature, top_p, generator: keywords of sampling.SamplingSettings
    stop: list[str]
    stream: bool
    include_usage: bool
    guard_text: str  # what the guard reads on the way in


def sampling_settings(body: dict) -> dict:
    """`temperature`, `top_p` and `seed` as keywords of `sampling.SamplingSettings`. temperature 0 is
    greedy decoding; OpenAI's default is 1 (sampling)."""
    temperature = _field(body, "temperature", "number", 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature={temperature} is out of range: use 0 (always the most likely "
                            "token) to 2.", param="temperature", code="invalid_value")
    top_p = _field(body, "top_p", "number", 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p={top_p} is out of range: use a number above 0 and at most 1 (1 keeps "
                            "every token).", param="top_p", code="invalid_value")
    seed = _field(body, "seed", "integer")
    if temperature == 0:
        return {"do_sample": False}
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # a fresh random seed
    else:
        generator.manual_seed(seed)
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p),
            "generator": generator}


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else _field(body, "stop", "array", [])
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                            "of them.", param="stop", code="invalid_value")
    return stops


def _max_tokens(body: dict, limits: Limits, prompt_tokens: int, context: int, param: str) -> int:
    name = "max_tokens" if "max_tokens" in body else "max_completion_tokens"  # the newer name
    asked = _field(body, name, "integer")
    room = context - prompt_tokens  # new tokens the context has room for
    if asked is not None and not 1 <= asked <= limits.max_tokens:
        raise APIError(400, f"{name}={asked} is out of range: ask for 1 to {limits.max_tokens} new tokens.",
                       param=name, code="invalid_value")
    if room < (asked or 1):
        asks = f" and {name} asks for {asked} more" if asked else ""
        fix = f" or lower {name} to {room}" if room > 0 else ""
        raise APIError(400, f"This model's context holds {context} tokens; the prompt has {prompt_tokens}"
                            f"{asks}. Shorten the prompt{fix}.", param=param, code="context_length_exceeded")
    return asked or min(limits.default_max_tokens, limits.max_tokens, room)


def check_messages(body: dict, tokenizer) -> list[dict]:
    """The chat `messages`: a non-empty list of {"role", "content"} with known roles, text
    content, and none of the tokenizer's special tokens (which would let a message forge turns)."""
    messages = _field(body, "messages", "array", required=True)
    if not messages:
        raise APIError(400, "'messages' is empty: send at least one {\"role\": \"user\", \"content\": ...}.",
                       param="messages", code="invalid_value")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'.", param=where,
                           code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role is {role!r}: use one of {', '.join(ROLES)}.",
                           param=f"{where}.role", code="invalid_value")
        content = message.get("content")
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string.", param=f"{where}.content",
                           code="invalid_type")
        check_special_tokens(content, tokenizer, f"{where}.content")
        checked.append({"role": role, "content": content})
    return checked


def check_special_tokens(text: str, tokenizer, param: str) -> None:
    """Refuse text holding a special token such as <|im_start|>: the tokenizer would read it as the
    real marker, and the text could then open a system turn of its own (prompt injection)."""
    for token in tokenizer.all_special_tokens:
        if token in text:
            raise APIError(400, f"{param} contains the special token {token!r}, which marks turns of the "
                                "chat format; remove it.", param=param, code="special_token")


def _text(body: dict, name: str) -> str:
    text = _field(body, name, "string", required=True)
    if not text:
        raise APIError(400, f"'{name}' is empty: send some text.", param=name, code="invalid_value")
    return text


# --- generating ---------------------------------------------------------------------------------

def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string.

    >>> _held_back("Hello, Wor", ["World"]), _held_back("Hello", ["World"])
    (3, 0)
    """
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in `text` begins, if one is there."""
    return min((text.index(s) for s in stops if s in text), default=None)


class Generation:
    """The text of one continuation, piece by piece as it is produced, cut before the first stop
    string. Once iterated: `completion_tokens`, and `finish_reason` ("stop": an end-of-turn token
    or a stop string; "length": max_tokens reached)."""

    def __init__(self, model, tokenizer, request: GenerationRequest):
        self.model, self.tokenizer, self.request = model, tokenizer, request
        self.completion_tokens, self.finish_reason = 0, "length"

    def __iter__(self) -> Iterator[str]:
        request, stops = self.request, self.request.stop
        eos = self._eos_ids()
        decoder, pending = sampling.IncrementalDecoder(self.tokenizer), ""
        settings = sampling.SamplingSettings(request.max_tokens, eos_token_id=sorted(eos), **request.settings)
        tokens = sampling.generate_tokens(self.model, request.input_ids, settings)
        for token in tokens:
            self.completion_tokens += 1
            if int(token) in eos:
                self.finish_reason = "stop"
            pending += decoder.add(int(token))
            if (cut := _first_stop(pending, stops)) is not None:
                pending, self.finish_reason = pending[:cut], "stop"
                break
            keep = _held_back(pending, stops)
            if len(pending) > keep:
                yield pending[:len(pending) - keep]
                pending = pending[len(pending) - keep:]
        else:
            pending += decoder.flush()
            if (cut := _first_stop(pending, stops)) is not None:
                pending, self.finish_reason = pending[:cut], "stop"
        tokens.close()  # a stop string ends generation early
        if pending:
            yield pending

    def _eos_ids(self) -> set[int]:
        """The model's end-of-sequence ids and the tokenizer's (a chat model's end of turn)."""
        ids = set()
        model_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (model_eos, self.tokenizer.eos_token_id):
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
        return ids


# --- the app ------------------------------------------------------------------------------------

@dataclass
class Served:
    """What the routes share: the model, its limits, its gate and its guard."""

    model: Any
    tokenizer: Any
    model_name: str
    limits: Limits
    gate: Gate
    guard: Guard | None

    @property
    def context(self) -> int:
        return sampling.context_length(self.model)

    def chat_request(self, body: dict) -> GenerationRequest:
        messages = check_messages(body, self.tokenizer)
        if not self.has_chat_template:
            raise APIError(400, f"{self.model_name} has no chat template: use POST /v1/completions with a "
                                "'prompt'.", param="messages", code="no_chat_template")
        user_text = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
        return self._request(body, self._chat_ids(messages), user_text, "messages")

    def completion_request(self, body: dict) -> GenerationRequest:
        prompt = _text(body, "prompt")
        return self._request(body, self.tokenizer(prompt)["input_ids"], prompt, "prompt")

    def predict_request(self, body: dict) -> GenerationRequest:
        text = _text(body, "text")
        check_special_tokens(text, self.tokenizer, "text")
        body = dict(body, temperature=body.get("temperature", 0))  # /predict: greedy unless asked
        messages = [{"role": "user", "content": text}]
        ids = self._chat_ids(messages) if self.has_chat_template else self.tokenizer(text)["input_ids"]
        return self._request(body, ids, text, "text")

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt in the model's own chat format, ending where the assistant's turn begins."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]

    def _request(self, body: dict, ids: list[int], guard_text: str, param: str) -> GenerationRequest:
        _field(body, "model", "string")
        if body.get("model") not in (None, self.model_name):
            raise APIError(404, f"The model {body['model']!r} is not served here; this server serves "
                                f"{self.model_name!r}.", param="model", code="model_not_found")
        if _field(body, "n", "integer", 1) != 1:
            raise APIError(400, "n must be 1: this server writes one choice per request.", param="n",
                           code="invalid_value")
        stream = _field(body, "stream", "boolean", False)
        options = _field(body, "stream_options", "object", {})
        include_usage = bool(_field(options, "include_usage", "boolean"))
        max_tokens = _max_tokens(body, self.limits, len(ids), self.context, param)
        request = GenerationRequest(torch.tensor([ids]), max_tokens, sampling_settings(body),
                                    _stop_strings(body), stream, include_usage, guard_text)
        self.check_guard(guard_text, "user", param)
        return request

    def check_guard(self, text: str, role: str, param: str | None = None) -> None:
        """Ask the guard about `text`; its reason, if it gives one, refuses the request (400)."""
        reason = self.guard(text, role) if self.guard else None
        if reason:
            where = "input" if role == "user" else "output"
            logger.info("guard refused the %s: %s", where, reason)
            raise APIError(400, f"Refused by the server's guard ({where}): {reason}", param=param,
                           code=f"{where}_refused")

    def generate(self, request: GenerationRequest) -> tuple[str, Generation]:
        """The whole text (checked by the guard), holding the model meanwhile."""
        self.gate.enter()
        try:
            generation = Generation(self.model, self.tokenizer, request)
            text = "".join(generation)
        finally:
            self.gate.leave()
        self.check_guard(text, "assistant")
        return text, generation

    def usage(self, request: GenerationRequest, generation: Generation) -> dict:
        prompt = request.input_ids.shape[1]
        return {"prompt_tokens": prompt, "completion_tokens": generation.completion_tokens,
                "total_tokens": prompt + generation.completion_tokens}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _stream(served: Served, request: GenerationRequest, chunk: Callable[..., dict]) -> flask.Response:
    """Server-sent events: one chunk per piece of text, then the finish reason, then [DONE].
    The model is taken before the answer starts (so a busy server can still say 503) and given
    back when the stream ends or the client goes away."""
    served.gate.enter()
    generation = Generation(served.model, served.tokenizer, request)

    def events() -> Iterator[str]:
        yield _sse(chunk(role=True))
        text = ""
        try:
            for piece in generation:
                text += piece
                served.check_guard(text, "assistant")  # before the piece leaves the server
                yield _sse(chunk(piece))
        except APIError as err:
            yield _sse(err.body())
            return
        except Exception:  # the answer has started: say it failed, in the stream
            logger.exception("generation failed while streaming")
            yield _sse(APIError(500, "The generation failed; the server's log has the details.",
                                kind="server_error").body())
            return
        yield _sse(chunk(finish_reason=generation.finish_reason))
        if request.include_usage:
            yield _sse(chunk(usage=served.usage(request, generation)))
        yield _sse("[DONE]")

    response = flask.Response(events(), mimetype="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(served.gate.leave)
    return response


def _envelope(served: Served, kind: str) -> dict:
    return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{secrets.token_hex(12)}",
            "object": kind, "created": int(time.time()), "model": served.model_name}


def _chunker(served: Served, kind: str, chat: bool) -> Callable[..., dict]:
    """Build the stream's chunks, all with the same id, in OpenAI's chunk format."""
    envelope = _envelope(served, kind)

    def chunk(piece: str = "", *, role: bool = False, finish_reason: str | None = None,
              usage: dict | None = None) -> dict:
        if usage is not None:
            return dict(envelope, choices=[], usage=usage)
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": piece} if piece else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": piece, "finish_reason": finish_reason, "logprobs": None}
        return dict(envelope, choices=[choice])

    return chunk


def _http_error(err: HTTPException) -> APIError:
    """werkzeug's own 4xx (unknown path, wrong method, body too large) as an OpenAI-shaped error."""
    request = flask.request
    if err.code == 404:
        message = f"There is no {request.path} here. Routes: {', '.join(ROUTES)}."
    elif err.code == 405:
        allowed = ", ".join(sorted(set(err.valid_methods or []) - {"HEAD", "OPTIONS"}))
        message = f"{request.method} is not allowed on {request.path}: use {allowed}."
    elif err.code == 413:
        cap = flask.current_app.config["MAX_CONTENT_LENGTH"]
        message = f"The body is over the {cap:,}-byte cap. Send a shorter prompt."
    else:
        message = f"{err.name}: {err.description}"
    headers = {k: v for k, v in err.get_headers() if k == "Allow"}
    return APIError(err.code or 400, message, code=err.name.lower().replace(" ", "_"), headers=headers)


def create_app(model, tokenizer, *, model_name: str = "llama-lab", api_key: str | None = None,
               guard: Guard | None = None, **limits) -> flask.Flask:
    """A Flask app that serves `model` (see the module's docstring for the routes).

    model_name: the name clients use (`model=` in the openai client) and `/v1/models` lists.
    api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
    guard: `guard(text, role) -> reason or None`, run on the request's text (role "user") and on
        the model's answer (role "assistant"); a reason refuses the request with a 400.
    limits: any field of `Limits` (max_tokens, default_max_tokens, max_body_bytes, max_waiting,
        wait_timeout_s, retry_after_s).
    """
    unknown = set(limits) - {f.name for f in fields(Limits)}
    if unknown:
        raise InvalidSettingError(f"Unknown limit(s) {', '.join(sorted(unknown))}: use "
                                  f"{', '.join(f.name for f in fields(Limits))}.")
    checked = Limits(**limits)
    served = Served(model, tokenizer, model_name, checked, Gate(checked), guard)
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = served.limits.max_body_bytes
    app.extensions["llama_lab"] = served
    _add_guards(app, api_key)

    @app.post("/v1/chat/completions")
    def chat_completions():
        request = served.chat_request(read_body(flask.request))
        if request.stream:
            return _stream(served, request, _chunker(served, "chat.completion.chunk", chat=True))
        text, generation = served.generate(request)
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": generation.finish_reason, "logprobs": None}
        return dict(_envelope(served, "chat.completion"), choices=[choice],
                    usage=served.usage(request, generation))

    @app.post("/v1/completions")
    def completions():
        request = served.completion_request(read_body(flask.request))
        if request.stream:
            return _stream(served, request, _chunker(served, "text_completion", chat=False))
        text, generation = served.generate(request)
        choice = {"index": 0, "text": text, "finish_reason": generation.finish_reason, "logprobs": None}
        return dict(_envelope(served, "text_completion"), choices=[choice],
                    usage=served.usage(request, generation))

    @app.post("/predict")
    def predict():
        request = served.predict_request(read_body(flask.request))
        if request.stream:
            raise APIError(400, "/predict does not stream: use POST /v1/chat/completions with "
                                '"stream": true.', param="stream", code="invalid_value")
        text, generation = served.generate(request)
        return {"text": text, "finish_reason": generation.finish_reason, **served.usage(request, generation)}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llama-lab", "context_length": served.context}]}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name, "running": served.gate.running,
                "waiting": served.gate.waiting}

    return app


def _add_guards(app: flask.Flask, api_key: str | None) -> None:
    """The API key check, the error handlers, and a log line per request (no headers, no bodies:
    neither the key nor what users write reaches the log)."""

    @app.before_request
    def check_api_key():
        flask.g.started = time.perf_counter()
        if api_key is None or flask.request.path == "/health":
            return None
        scheme, _, given = flask.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' (the openai "
                                "client does, from api_key=...).", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.after_request
    def log_request(response: flask.Response):
        seconds = time.perf_counter() - flask.g.get("started", time.perf_counter())
        logger.info("%s %s %d %.2fs", flask.request.method, flask.request.path, response.status_code, seconds)
        return response

    app.register_error_handler(APIError, APIError.response)
    app.register_error_handler(HTTPException, lambda err: _http_error(err).response())

    @app.errorhandler(Exception)
    def internal_error(err: Exception):
        logger.exception("unexpected error on %s %s", flask.request.method, flask.request.path)
        return APIError(500, "The server failed on this request; the server's log has the details.",
                        kind="server_error", code="internal_error").response()


# --- running it ---------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """True when `host` is reachable only from this machine (127.0.0.0/8, ::1, localhost).

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What binding to `host` exposes, or None for a loopback address."""
    if is_loopback(host):
        return None
    everywhere = host in ("0.0.0.0", "::", "")
    who = "every machine that can reach this one" if everywhere else f"the network of {host}"
    key = ("anyone who has the API key" if api_key else
           "anyone, without a password (no --api-key was given)")
    return (f"WARNING: listening on {host} exposes the model to {who}: {key} can use it, read its "
            "answers and keep the machine busy. The traffic is plain HTTP, unencrypted. Prefer "
            "127.0.0.1 behind an SSH tunnel or a TLS reverse proxy with authentication.")


def client_snippet(url: str, model_name: str, api_key: bool) -> str:
    """Python to paste into a client: the official openai package, pointed at this server
    (the key, when there is one, read from the environment, never printed)."""
    imports = "import os\nfrom openai import OpenAI\n" if api_key else "from openai import OpenAI\n"
    key = f'os.environ["{API_KEY_ENV}"]' if api_key else '"unused"'
    return (f"{imports}\nclient = OpenAI(base_url=\"{url}/v1\", api_key={key})\n"
            f"reply = client.chat.completions.create(model=\"{model_name}\", max_tokens=64,\n"
            "    messages=[{\"role\": \"user\", \"content\": \"What is the capital of France?\"}])\n"
            "print(reply.choices[0].message.content)")


def server_threads(limits: Limits) -> int:
    """waitress worker threads: the generating one, the waiting ones, and spare ones so a busy
    server still answers /health and 503 at once."""
    return limits.max_waiting + 3


def make_server(app: flask.Flask, host: str = "127.0.0.1", port: int = 8000):
    """A waitress server (a production WSGI server, pure Python, Windows too) for `app`, bound and
    ready: `.effective_port`, then `.run()` serves until interrupted, `.close()`."""
    from waitress.server import create_server

    limits = app.extensions["llama_lab"].limits
    # waitress reads the whole body before the app sees it (past 512 KB into a temporary file, not
    # memory): bound that too, far above the app's cap, so that clients get the app's JSON 413.
    body_limit = max(WAITRESS_BODY_LIMIT, 4 * limits.max_body_bytes)
    return create_server(app, host=host, port=port, threads=server_threads(limits),
                         max_request_body_size=body_limit, ident="llama-lab")


class BackgroundServer:
    """`app` on waitress in a thread of this process (notebooks, tests): `.url`, then `.stop()`.
    Port 0 lets the system pick a free port.

    >>> from llama_lab import load_model
    >>> with BackgroundServer(create_app(*load_model("tiny-random"))) as server:
    ...     import requests
    ...     requests.get(server.url + "/health", timeout=10).json()["status"]
    'ok'
    """

    def __init__(self, app: flask.Flask, host: str = "127.0.0.1", port: int = 0):
        self._server = make_server(app, host, port)
        self.url = f"http://{host}:{self._server.effective_port}"
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="llama-lab-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """waitress's loop, one poll at a time (at most `asyncore_loop_timeout`, 1 s) until `stop`."""
        from waitress import wasyncore

        adj = self._server.adj
        while not self._stopping.is_set():
            wasyncore.loop(adj.asyncore_loop_timeout, adj.asyncore_use_poll, self._server._map, count=1)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the requests in flight (up to `timeout`) while the loop still sends their answers,
        end the loop, then close every socket: no poll can meet a closed one."""
        from waitress import wasyncore

        self._server.task_dispatcher.shutdown(timeout=timeout)
        self._stopping.set()
        self._thread.join(timeout)
        wasyncore.close_all(self._server._map)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
