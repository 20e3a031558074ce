"""
The chat server: the browser UI, nanochat's streaming protocol, and an OpenAI-compatible API, all fed
by one continuous-batching scheduler (concurrent chats decode together in one batch).

python -m web.server --checkpoint /tmp/d20-export          # a directory from python -m nanochat_jax.export
python -m web.server --source sft --tag d20 --port 8000    # or a training checkpoint

GET  /                     the chat UI
POST /chat/completions     nanochat: {messages, temperature?, top_k?, max_tokens?} -> SSE {"token"} ... {"done": true}
POST /v1/chat/completions  OpenAI chat completions, stream true or false
GET  /v1/models, /health, /stats
Bad requests get HTTP 400 with JSON {"error": {"message": ...}, "detail": ...} naming the problem.
"""
import argparse
import json
import os
import time
import uuid

from flask import Flask, Response, jsonify, request, send_from_directory

from nanochat_jax import xla_env
from nanochat_jax.engine import Engine
from nanochat_jax.scheduler import Scheduler
from nanochat_jax.tokenizer import TextStream

# nanochat's abuse limits
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class BadRequest(ValueError):
    """A request that breaks the protocol or the limits; the message is sent back to the client."""


def _number(body, name, default, lo, hi, kind):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be in [{lo}, {hi}], got {value}")
    return kind(value)


def _text(content, i):
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string")
    if not content.strip():
        raise BadRequest(f"messages[{i}].content is empty")
    if len(content) > MAX_MESSAGE_CHARS:
        raise BadRequest(f"messages[{i}] has {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}")
    return content


def parse_chat(body, defaults):
    """Validate a chat request: (messages, temperature, top_k, max_tokens, extra fields we read)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"{len(messages)} messages; the limit is {MAX_MESSAGES}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}] must be an object with role system, user or assistant")
        if m["role"] == "system" and i != 0:
            raise BadRequest(f"messages[{i}]: a system message may only come first")
        clean.append({"role": m["role"], "content": _text(m.get("content"), i)})
    total = sum(len(m["content"]) for m in clean)
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"the conversation has {total} characters; the limit is {MAX_TOTAL_CHARS}")
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    for i, m in enumerate(turns):
        if m["role"] != ("user", "assistant")[i % 2]:
            raise BadRequest("roles must alternate user/assistant, starting with user (after an optional system message)")
    if turns[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user")
    temperature = _number(body, "temperature", defaults["temperature"], 0.0, 2.0, float)
    top_k = _number(body, "top_k", defaults["top_k"], 0, MAX_TOP_K, int)
    max_tokens = _number(body, "max_tokens", defaults["max_tokens"], 1, MAX_MAX_TOKENS, int)
    return clean, temperature, top_k, max_tokens


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(scheduler, tokenizer, model_name="nanochat", temperature=0.8, top_k=50, max_tokens=512):
    app = Flask(__name__, static_folder=None)
    defaults = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
    max_len = scheduler.engine.max_len

    def error(message, status=400):
        kind = "invalid_request_error" if status == 400 else "server_error"
        return jsonify(error={"message": message, "type": kind}, detail=message), status

    @app.errorhandler(BadRequest)
    def bad_request(e):
        return error(str(e))

    @app.errorhandler(404)
    def not_found(e):
        return error(f"no route {request.path}", 404)

    @app.errorhandler(405)
    def wrong_method(e):
        return error(f"{request.method} is not allowed on {request.path}", 405)

    def read_json():
        body = request.get_json(silent=True)
        if body is None:
            raise BadRequest("the body must be valid JSON (Content-Type: application/json)")
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def start(messages, temperature, top_k, max_tokens, top_p=1.0, seed=None):
        """Render the conversation and queue it: (request, prompt length)."""
        prompt = tokenizer.render_conversation({"messages": messages}, max_tokens=None)[0]
        prompt.append(tokenizer.encode_special("<|assistant_start|>"))
        if len(prompt) >= max_len:
            raise BadRequest(f"the conversation is {len(prompt)} tokens; the model's context is {max_len}")
        return scheduler.submit(prompt, max_tokens, temperature, top_k, top_p, seed), len(prompt)

    def pieces(req):
        """Text pieces of a request's tokens; never splits a multi-byte character. Cancels on exit, so a
        client that disconnects (the server closes this generator) frees its row."""
        stream = TextStream(tokenizer)
        try:
            for token in req:
                if piece := stream.push(token):
                    yield piece
            if tail := stream.flush():
                yield tail
        finally:
            req.cancel()

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/health")
    def health():
        return jsonify(status="ok", ready=scheduler.ready.is_set(), model=model_name, slots=scheduler.slots)

    @app.get("/stats")
    def stats():
        return jsonify(scheduler.snapshot())

    @app.get("/v1/models")
    def models():
        return jsonify(object="list", data=[{"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat_jax"}])

    @app.post("/chat/completions")
    def chat():
        req, _ = start(*parse_chat(read_json(), defaults))

        def events():
            try:
                for piece in pieces(req):
                    yield sse({"token": piece})
                yield sse({"done": True})
            except RuntimeError as e:
                yield sse({"error": str(e)})
        return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    def openai_chat():
        body = read_json()
        messages, temperature, top_k, max_tokens = parse_chat(dict(body, max_tokens=body.get("max_completion_tokens", body.get("max_tokens"))), defaults)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, float)
        if top_p == 0.0:
            raise BadRequest("top_p must be greater than 0")
        if _number(body, "n", 1, 1, 1, int) != 1:
            raise BadRequest("only n = 1 is supported")
        seed = _number(body, "seed", None, 0, 2**31 - 1, int)
        if body.get("stop") is not None:
            raise BadRequest("stop sequences are not supported; the model stops at the end of its turn")
        req, prompt_tokens = start(messages, temperature, top_k, max_tokens, top_p, seed)
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.get("model") or model_name)
        usage = lambda: dict(prompt_tokens=prompt_tokens, completion_tokens=req.generated, total_tokens=prompt_tokens + req.generated)

        if not body.get("stream"):
            try:
                text = "".join(pieces(req))
            except RuntimeError as e:
                return error(str(e), 500)
            choice = dict(index=0, message=dict(role="assistant", content=text), finish_reason=req.finish_reason, logprobs=None)
            return jsonify(dict(meta, object="chat.completion", choices=[choice], usage=usage()))

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunks():
            chunk = lambda delta, finish=None: sse(dict(meta, object="chat.completion.chunk",
                                                        choices=[dict(index=0, delta=delta, finish_reason=finish, logprobs=None)]))
            yield chunk({"role": "assistant", "content": ""})
            try:
                for piece in pieces(req):
                    yield chunk({"content": piece})
            except RuntimeError as e:
                yield sse({"error": {"message": str(e), "type": "server_error"}})
                return
            yield chunk({}, req.finish_reason)
            if include_usage:
                yield sse(dict(meta, object="chat.completion.chunk", choices=[], usage=usage()))
            yield "data: [DONE]\n\n"
        return Response(chunks(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def build(checkpoint=None, source=None, tag=None, step=None, slots=Scheduler.SLOTS, warmup=True, prefill_rows=Scheduler.PREFILL_ROWS,
          chunk=Scheduler.CHUNK, **app_kwargs):
    """Load a model and return the app with its scheduler running; for gunicorn, e.g.
    gunicorn --workers 1 --threads 64 'web.server:build(checkpoint="/tmp/d20-export")'"""
    from nanochat_jax.export import load_model
    model, tokenizer, description = load_model(checkpoint, source, tag, step)
    print(f"serving {description}: {model.config}")
    scheduler = Scheduler(Engine(model, tokenizer), slots=slots, warmup=warmup, prefill_rows=prefill_rows, chunk=chunk)
    name = os.path.basename(os.path.normpath(checkpoint)) if checkpoint else description.replace(" ", "-")
    return create_app(scheduler, tokenizer, model_name=name, **app_kwargs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="nanochat_jax chat server")
    parser.add_argument("--checkpoint", type=str, default=None, help="an export directory (python -m nanochat_jax.export)")
    parser.add_argument("-i", "--source", type=str, default=None, choices=["base", "mid", "sft", "rl"], help="or a training checkpoint: stage")
    parser.add_argument("-g", "--tag", type=str, default=None, help="training run (default: the most recent)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("-p", "--port", type=int, default=8000)
    parser.add_argument("--host", type=str, default="127.0.0.1", help="0.0.0.0 to listen on all interfaces")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default when a request gives none")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default when a request gives none")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default when a request gives none")
    parser.add_argument("--slots", type=int, default=Scheduler.SLOTS, help="rows of the shared decode batch (concurrent generations)")
    parser.add_argument("--prefill-rows", type=int, default=Scheduler.PREFILL_ROWS, help="most waiting requests prefilled in one call (a power of two)")
    parser.add_argument("--chunk", type=int, default=Scheduler.CHUNK, help=f"most decode steps per round between the host's reads (a round of fewer than the device loop's "
                        f"{Engine.CHECK_EVERY} costs {Engine.CHECK_EVERY})")
    parser.add_argument("--no-warmup", action="store_true", help="compile shapes on first use instead of at start-up")
    args = parser.parse_args()
    xla_env.configure()  # XLA flags, GPU memory fraction, compilation cache: before JAX starts
    app = build(args.checkpoint, args.source, args.tag, args.step, args.slots, not args.no_warmup, args.prefill_rows, args.chunk,
                temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
    print(f"chat UI on http://{args.host}:{args.port}/")
    app.run(host=args.host, port=args.port, threaded=True)
