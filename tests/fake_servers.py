"""Fake model servers of the kinds users run, each answering as the real one documents
(the source of each behaviour is named beside it; facts from
the sources named next to each one). Real HTTP servers on 127.0.0.1, built on
tests/fakes.py's FakeLLM (its scripted reply queue and request record).

- FakeKeyed: any FakeLLM kind that answers 401 to a request without its key.
- FakeLMStudio: LM Studio 0.4: `/api/v1/models` with typed entries (an embedding model
  loaded first, as RAG users have it) and JIT loading on the first chat request.
- FakeLlamaCppPython: llama-cpp-python 0.3's server: a stream cut to serve another
  request, and a prompt over n_ctx that ends the stream silently (400 unstreamed).
- FakeLlamaServer: llama.cpp's llama-server with auto slots (4) and one unified KV pool
  that answers 500 "Context size has been exceeded" when the requests in flight pass it.
- FakeVLLM: vLLM's OpenAI server: /v1/models cards with max_model_len.
- FakeOllama: Ollama 0.33: `/`, `/api/version`, `/api/tags`, `/api/ps`, `/api/show`, a
  native `/api/chat` (NDJSON) that honours `options.num_ctx`, and an OpenAI endpoint
  that cuts an over-long prompt silently, as Ollama does.

Tokens are counted as 4 characters each (FakeLLM's own rule), so a test can say how many
tokens a prompt is.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fakes import FakeLLM, _Handler, _prompt_chars, _split

__all__ = ["FakeKeyed", "FakeLlamaCppPython", "FakeLlamaServer", "FakeLMStudio", "FakeVLLM",
           "FakeOllama", "OLLAMA_NUM_KEEP", "ollama_kept_tokens"]

CHARS_PER_FAKE_TOKEN = 4
# Ollama keeps num_keep tokens (default 4) plus the tail when a prompt passes num_ctx, up to
# num_ctx - (num_ctx - num_keep) / 2 tokens in all (llm/llama_server.go; ollama#3839, #17889)
OLLAMA_NUM_KEEP = 4
OLLAMA_DEFAULT_NUM_CTX = 4096      # under 24 GiB of VRAM and on CPU (docs/context-length.mdx)


def ollama_kept_tokens(num_ctx: int) -> int:
    """How many tokens Ollama keeps of a prompt longer than num_ctx (llm/llama_server.go)."""
    return OLLAMA_NUM_KEEP + (num_ctx - OLLAMA_NUM_KEEP) // 2


class _KeyedHandler(_Handler):
    """401 to every request without `Authorization: Bearer <fake.api_key>`, with LM
    Studio 0.4's body for Require Authentication (opencode-lmstudio#41); llama-server
    and vLLM --api-key answer 401 the same way (opencode-lmstudio#41)."""

    def _refused(self) -> bool:
        key = self.server.fake.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return False
        self._record(self._read_body())
        self._send(401, {"error": {"message": "Invalid or missing API key",
                                   "type": "invalid_request", "code": "invalid_api_key"}})
        return True

    def do_GET(self):  # noqa: N802
        self._guard(lambda: self._refused() or self._get())

    def do_POST(self):  # noqa: N802
        self._guard(lambda: self._refused() or self._post())


class FakeKeyed(FakeLLM):
    """FakeLLM (LM Studio by default) with "Require Authentication" on: api_key."""

    _handler = _KeyedHandler

    def __init__(self, api_key: str = "sk-fake-secret") -> None:
        super().__init__()
        self.api_key: str | None = api_key


class _OllamaHandler(_Handler):
    def _text(self, status: int, text: str) -> None:
        self._send(status, text, content_type="text/plain; charset=utf-8")

    def _get(self) -> None:
        fake: FakeOllama = self.server.fake   # type: ignore[assignment]
        raw = self._read_body()
        self._record(raw)
        path = self.path.split("?", 1)[0]
        if path == "/":                    # "Ollama is running" (ollama/ollama docs/api.md)
            self._text(200, "Ollama is running")
        elif path == "/api/version":       # docs/api.md: {"version": "0.33.0"}
            self._send(200, {"version": fake.version})
        elif path == "/api/tags":          # docs/api.md; cloud: remote_host (docs/cloud.mdx)
            self._send(200, {"models": [fake._tag(name) for name in fake.pulled]})
        elif path == "/api/ps":            # api/types.go ProcessModelResponse
            self._send(200, {"models": [{**fake._tag(name), "expires_at": "2026-12-08T03:00:00Z",
                                         "size_vram": 1 << 30, "context_length": fake.loaded_ctx}
                                        for name in fake.running]})
        elif path == "/v1/models":         # most recently modified first, every pulled model
            # (server/model_list_cache.go), embedding and cloud models included
            self._send(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 1765000000, "owned_by": "library"}
                for name in fake.pulled]})
        else:
            self._text(404, "404 page not found")

    def _missing(self, name: str) -> bool:
        if name in self.server.fake.pulled:
            return False
        # server/routes.go: unpulled model
        self._send(404, {"error": f'model "{name}" not found, try pulling it first'})
        return True

    def _post(self) -> None:
        fake: FakeOllama = self.server.fake   # type: ignore[assignment]
        raw = self._read_body()
        rec = self._record(raw)
        body = rec["json"] if isinstance(rec["json"], dict) else {}
        path = self.path.split("?", 1)[0]
        name = body.get("model") or ""
        if path == "/api/show":            # capabilities, parameters, model_info (§9)
            if self._missing(name):
                return
            info = fake.pulled[name]
            self._send(200, {"capabilities": info["capabilities"],
                             "parameters": info.get("parameters", ""),
                             "details": {"family": "llama", "parameter_size": "8B"},
                             "model_info": {"general.architecture": "llama",
                                            "llama.context_length": info["trained_ctx"]}})
            return
        if path not in ("/api/chat", "/v1/chat/completions"):
            self._text(404, "404 page not found")
            return
        if self._missing(name):
            return
        if "completion" not in fake.pulled[name]["capabilities"]:
            self._send(400, {"error": f'"{name}" does not support chat'})    # server/routes.go
            return
        with fake._lock:
            reply = fake._queue.pop(0) if fake._queue else None
        if reply is None and fake.default_reply is not None:
            reply = fake._reply(fake.default_reply)
        if reply is None:
            self._send(400, {"error": "fake server: no scripted reply queued"})
            return
        # The OpenAI endpoint cannot set num_ctx (docs/api/openai-compatibility.mdx): the
        # model's context is what it was loaded with; the native one takes options.num_ctx.
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        num_ctx = options.get("num_ctx") if path == "/api/chat" else None
        num_ctx = num_ctx if isinstance(num_ctx, int) and num_ctx > 0 else fake.loaded_ctx
        rec["num_ctx"] = num_ctx
        seen = fake._cut(body, num_ctx)
        rec["seen_tokens"] = _prompt_chars(seen) // CHARS_PER_FAKE_TOKEN
        with fake._slot():
            if path == "/v1/chat/completions":
                self._rec = rec
                self._play(reply, seen)
            else:
                self._native(reply, seen, rec, body)

    def _native(self, r: dict, seen: dict, rec: dict, body: dict) -> None:
        """Native /api/chat: NDJSON, {"message": {"content"}, "done": false} lines, then
        done: true with prompt_eval_count, eval_count, done_reason (docs/api.md)."""
        if r["status"] != 200:
            self._send(r["status"], {"error": r["error"] or "fake error"})
            return
        model = body.get("model")
        pieces = _split(r["content"], r["chunk_size"])
        prompt_tokens = _prompt_chars(seen) // CHARS_PER_FAKE_TOKEN
        stream = body.get("stream", True) is not False      # docs/api.md: stream defaults to true
        done = {"model": model, "created_at": "2026-12-08T01:00:00Z",
                "message": {"role": "assistant", "content": "" if stream else r["content"]},
                "done": True, "done_reason": "length" if r["finish_reason"] == "length" else "stop",
                "total_duration": 1000, "prompt_eval_count": prompt_tokens,
                "eval_count": len(pieces)}
        if not stream:
            self._send(200, done)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunked = True
        # thinking comes first, in message.thinking, unless the request says think: false
        # (docs/api.md); "cut" with no content ends the stream while the model thinks
        thinking = _split(r["reasoning"], r["chunk_size"]) if r["reasoning"] and \
            body.get("think") is not False else []
        lines = [{"role": "assistant", "content": "", "thinking": piece} for piece in thinking]
        lines += [{"role": "assistant", "content": piece} for piece in pieces]
        for message in lines:
            if r["chunk_delay_s"]:
                time.sleep(r["chunk_delay_s"])
            self._write_sse(json.dumps({"model": model, "created_at": "2026-12-08T01:00:00Z",
                                        "message": message, "done": False}) + "\n")
        if r["fault"] == "cut":
            self.close_connection = True
            return
        self._write_sse(json.dumps(done) + "\n")


class FakeOllama(FakeLLM):
    """Ollama 0.33 (ollama/ollama docs/api.md, api/types.go, docs/context-length.mdx). pulled: name -> {capabilities,
    trained_ctx, parameters, remote_host?}, most recently pulled first; running: the
    names /api/ps lists; loaded_ctx: the context a model is loaded with when a request
    sets no num_ctx (the VRAM-tiered default). seen: what the model was given of each
    chat request (the prompt after Ollama's cut)."""

    _handler = _OllamaHandler

    def __init__(self) -> None:
        super().__init__()
        self._setup()

    def _setup(self) -> None:
        self.version = "0.33.0"
        self.pulled: dict[str, dict[str, Any]] = {
            "nomic-embed-text:latest": {"capabilities": ["embedding"], "trained_ctx": 2048},
            "gpt-oss:120b-cloud": {"capabilities": ["completion", "tools", "thinking"],
                                   "trained_ctx": 131072, "remote_host": "https://ollama.com:443"},
            "llama3.1:8b": {"capabilities": ["completion", "tools"], "trained_ctx": 131072},
        }
        self.running: list[str] = ["nomic-embed-text:latest", "llama3.1:8b"]
        self.loaded_ctx = OLLAMA_DEFAULT_NUM_CTX
        self.lmstudio = False

    def reset(self) -> "FakeOllama":
        super().reset()
        self._setup()
        return self

    @property
    def url(self) -> str:
        """The native API's base (no /v1): what a user passes as --base-url."""
        return self.root

    def _tag(self, name: str) -> dict:
        info = self.pulled[name]
        tag = {"name": name, "model": name, "modified_at": "2026-12-01T00:00:00Z", "size": 1 << 32,
               "digest": "0" * 64, "details": {"format": "gguf", "family": "llama"}}
        if info.get("remote_host"):
            tag["remote_host"] = info["remote_host"]
        return tag

    @staticmethod
    def _cut(body: dict, num_ctx: int) -> dict:
        """The request as the model sees it: a prompt past num_ctx keeps num_keep tokens
        and the tail (llm/llama_server.go), and the reply is 200 all the same."""
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        text = "".join(m["content"] for m in messages if isinstance(m.get("content"), str))
        if len(text) // CHARS_PER_FAKE_TOKEN <= num_ctx:
            return body
        keep = ollama_kept_tokens(num_ctx) * CHARS_PER_FAKE_TOKEN
        head = OLLAMA_NUM_KEEP * CHARS_PER_FAKE_TOKEN
        kept = text[:head] + text[-(keep - head):]
        return {**body, "messages": [{"role": "user", "content": kept}]}

    @property
    def chat_requests(self) -> list[dict]:
        return self._posts_to("/api/chat") + self._posts_to("/v1/chat/completions")


class _LMStudioHandler(_Handler):
    def _get(self) -> None:
        fake: FakeLMStudio = self.server.fake   # type: ignore[assignment]
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/api/v1/models":
            # lmstudio docs 1_developer/2_rest/list.md: type, key, loaded_instances[].config
            self._record(self._read_body())
            self._send(200, {"models": [{"type": kind, "key": key, "display_name": key,
                                         "max_context_length": 131072, "format": "gguf",
                                         "loaded_instances": [
                                             {"id": iid, "config": dict(config)}
                                             for iid, config in fake.instances.get(key, [])]}
                                        for key, kind in fake.catalog.items()]})
            return
        if path == "/v1/models":
            # JIT on: every downloaded model; off: only the loaded ones (core/headless.md)
            self._record(self._read_body())
            keys = [k for k in fake.catalog if fake.jit or fake.instances.get(k)]
            self._send(200, {"object": "list", "data": [
                {"id": k, "object": "model", "owned_by": "organization_owner"} for k in keys]})
            return
        super()._get()

    def _play(self, r: dict, req: dict) -> None:
        fake: FakeLMStudio = self.server.fake   # type: ignore[assignment]
        name = req.get("model")
        if name in fake.catalog and not fake.instances.get(name) and fake.jit:
            # JIT: the first request loads the model, at 4,096 tokens (bug tracker #2174)
            fake.instances[name] = [(name, {"context_length": fake.jit_context, "parallel": 4})]
        super()._play(r, req)


class FakeLMStudio(FakeLLM):
    """LM Studio 0.4 (lmstudio-ai/docs 1_developer/2_rest/list.md). catalog: key -> type ("llm", "vlm",
    "embedding"), in /api/v1/models order; instances: key -> [(instance id, config)];
    jit: the first chat request for a model loads it at jit_context tokens."""

    _handler = _LMStudioHandler

    def __init__(self) -> None:
        super().__init__()
        self._setup()

    def _setup(self) -> None:
        self.catalog = {"text-embedding-nomic-embed-text-v1.5": "embedding", "qwen3-8b": "llm",
                        "gemma-3-4b": "vlm"}
        self.instances: dict[str, list[tuple[str, dict]]] = {
            "text-embedding-nomic-embed-text-v1.5": [("text-embedding-nomic-embed-text-v1.5",
                                                      {"context_length": 2048})]}
        self.jit = True
        self.jit_context = 4096

    def reset(self) -> "FakeLMStudio":
        super().reset()
        self._setup()
        return self


class _LlamaCppPythonHandler(_Handler):
    def _post(self) -> None:
        fake: FakeLlamaCppPython = self.server.fake   # type: ignore[assignment]
        if self.path.split("?", 1)[0] != "/extras/tokenize/count":
            super()._post()
            return
        # llama_cpp/server/app.py count_query_tokens: {"input"} -> {"count"}
        rec = self._record(self._read_body())
        text = (rec["json"] or {}).get("input") or ""
        self._send(200, {"count": int(len(text) / fake.tokenizer_chars_per_token)})

    def _play(self, r: dict, req: dict) -> None:
        fake: FakeLlamaCppPython = self.server.fake   # type: ignore[assignment]
        prompt = _prompt_chars(req) // CHARS_PER_FAKE_TOKEN + 1
        if prompt >= fake.n_ctx or (fake.interrupt > 0 and req.get("stream")):
            with fake._lock:
                fake._queue.insert(0, r)            # not played: the next request gets it
        if prompt >= fake.n_ctx:
            if req.get("stream"):
                # the ValueError "Requested tokens (N) exceed context window of M" is raised
                # inside the stream (llama_cpp/llama.py, server/app.py): 200, then it ends
                self._start_sse()
                return
            # unstreamed it reaches llama_cpp/server/errors.py: 400 context_length_exceeded
            completion = req.get("max_tokens") or 0
            message = (f"This model's maximum context length is {fake.n_ctx} tokens. However, "
                       f"you requested {prompt + completion} tokens ({prompt} in the messages, "
                       f"{completion} in the completion). Please reduce the length of the "
                       "messages or completion.")
            self._send(400, {"error": {"message": message, "type": "invalid_request_error",
                                       "param": "messages", "code": "context_length_exceeded"}})
            return
        with fake._lock:
            cut = fake.interrupt > 0
            fake.interrupt -= cut
        if cut and req.get("stream"):
            # interrupt_requests (default True): another request arrived, so the stream in
            # flight sends [DONE] with no finish_reason (llama_cpp/server/app.py)
            self._start_sse()
            self._event({"id": "x", "object": "chat.completion.chunk", "model": req.get("model"),
                         "choices": [{"index": 0, "finish_reason": None,
                                      "delta": {"role": "assistant", "content": "partial an"}}]})
            self._event("[DONE]")
            return
        super()._play(r, req)


class FakeLlamaCppPython(FakeLLM):
    """llama-cpp-python's server (abetlen/llama-cpp-python llama_cpp/server/app.py): /v1/models owned_by "me", no
    /props, no usage in streams; n_ctx (default 2048, its --n_ctx default); interrupt:
    how many of the next streams end cut for another request; /extras/tokenize/count
    counts tokenizer_chars_per_token characters a token. A cut stream or an
    overflow does not use up the scripted reply it would have played."""

    _handler = _LlamaCppPythonHandler

    def __init__(self) -> None:
        super().__init__()
        self._setup()

    def _setup(self) -> None:
        self.lmstudio = False
        self.owned_by = "me"
        self.n_ctx = 2048
        self.interrupt = 0
        # /extras/tokenize/count's rule: SmolLM2's tokenizer gives 1.85 characters a token
        # on number-dense text (issue 21)
        self.tokenizer_chars_per_token = 1.85

    def reset(self) -> "FakeLlamaCppPython":
        super().reset()
        self._setup()
        return self


class _VLLMHandler(_Handler):
    def _get(self) -> None:
        fake: FakeVLLM = self.server.fake   # type: ignore[assignment]
        if self.path.split("?", 1)[0].rstrip("/") == "/v1/models":
            # vllm/entrypoints/openai/protocol.py ModelCard: id, …, root, max_model_len
            self._record(self._read_body())
            self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1765000000, "owned_by": "vllm", "root": m,
                 "parent": None, "max_model_len": fake.max_model_len} for m in fake.models]})
            return
        super()._get()


class FakeVLLM(FakeLLM):
    """vLLM (vllm-project/vllm docs: OpenAI-compatible server): one model, its max_model_len in /v1/models, no /props."""

    _handler = _VLLMHandler

    def __init__(self) -> None:
        super().__init__()
        self._setup()

    def _setup(self) -> None:
        self.lmstudio = False
        self.models = ["Qwen/Qwen3-8B"]
        self.max_model_len = 32768

    def reset(self) -> "FakeVLLM":
        super().reset()
        self._setup()
        return self


class _LlamaServerHandler(_Handler):
    def _play(self, r: dict, req: dict) -> None:
        fake: FakeLlamaServer = self.server.fake   # type: ignore[assignment]
        need = _prompt_chars(req) // CHARS_PER_FAKE_TOKEN + 1 + int(req.get("max_tokens") or 0)
        with fake._lock:
            over = fake.pool_used + need > fake.context_length
            if not over:
                fake.pool_used += need
                fake.pool_peak = max(fake.pool_peak, fake.pool_used)
        if over:
            # one unified KV pool: when it runs out the server ends the slots and answers 500
            # (llama.cpp PR #16736, #23652; lemonade#3276)
            fake.overflows += 1
            with fake._lock:
                fake._queue.insert(0, r)            # not played: the next request gets it
            self._send(500, {"error": {"code": 500, "message": "Context size has been exceeded.",
                                       "type": "server_error"}})
            return
        try:
            time.sleep(fake.hold_s)
            super()._play(r, req)
        finally:
            with fake._lock:
                fake.pool_used -= need


class FakeLlamaServer(FakeLLM):
    """llama-server started with no -np (auto: 4 slots, --kv-unified): /props reports
    total_slots 4 and each slot's n_ctx as the whole context (ggml-org/llama.cpp PR #16736, tools/server/README.md), while
    the slots share that one pool. hold_s: how long each request holds its tokens;
    pool_peak: the most tokens held at once; overflows: 500s sent."""

    def __init__(self) -> None:
        super().__init__()
        self._setup()

    _handler = _LlamaServerHandler

    def _setup(self) -> None:
        self.lmstudio, self.slots, self.context_length = False, 4, 4096
        self.models = ["model.gguf"]
        self.hold_s = 0.2
        self.pool_used = self.pool_peak = self.overflows = 0

    def reset(self) -> "FakeLlamaServer":
        super().reset()
        self._setup()
        return self
