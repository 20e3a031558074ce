"""The chat server, started for real (`python -m web.server --checkpoint <export>`) on a model trained
to answer "Hi" with "Hello! 👋 你好" (bytes tokenizer: the emoji and CJK span several tokens each).
Both protocols, the OpenAI client unchanged, the limits, disconnects, and 64 concurrent clients."""
import json
import time
import urllib.error
import urllib.request

import pytest

from conftest import CHAT_REPLIES
from web.loadtest import describe, run_load, stream_chat

HI = [{"role": "user", "content": "Hi"}]


def post(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_nanochat_protocol_streams_whole_characters(web_server):
    status, text = post(web_server + "/chat/completions", {"messages": HI, "temperature": 0.0})
    assert status == 200
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == {"done": True}
    pieces = [e["token"] for e in events[:-1]]
    assert "".join(pieces) == CHAT_REPLIES["Hi"]
    assert "👋" in pieces and "你" in pieces  # each arrives whole, never as broken bytes
    assert not any("\ufffd" in p for p in pieces)


def test_openai_client_works_unchanged(web_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=web_server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["export"]
    reply = client.chat.completions.create(model="export", messages=HI, temperature=0.0)
    assert reply.choices[0].message.content == CHAT_REPLIES["Hi"]
    assert reply.choices[0].finish_reason == "stop"
    n = len(CHAT_REPLIES["Hi"].encode()) + 1  # byte tokens, plus <|assistant_end|>
    assert (reply.usage.completion_tokens, reply.usage.total_tokens - reply.usage.prompt_tokens) == (n, n)

    stream = client.chat.completions.create(model="export", messages=HI, temperature=0.0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CHAT_REPLIES["Hi"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == n

    short = client.chat.completions.create(model="export", messages=HI, temperature=0.0, max_tokens=3)
    assert (short.choices[0].message.content, short.choices[0].finish_reason) == ("Hel", "length")
    # sampling with a seed is reproducible, streamed or not
    kw = dict(model="export", messages=[{"role": "user", "content": "Tell me"}], temperature=1.5, seed=11, max_tokens=30)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert a == b

    with pytest.raises(openai.BadRequestError, match="temperature must be in"):
        client.chat.completions.create(model="export", messages=HI, temperature=3.0)


def test_health_stats_and_ui(web_server):
    assert get(web_server + "/health")["status"] == "ok"
    stats = get(web_server + "/stats")
    assert stats["slots"] == 4 and stats["free_slots"] + stats["busy_slots"] == 4
    with urllib.request.urlopen(web_server + "/", timeout=30) as response:
        assert b'id="chat-input"' in response.read()


TOO_LONG = "x" * 8001
BAD_REQUESTS = [
    ({}, "messages must be a non-empty list"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 250 + HI}, "501 messages; the limit is 500"),
    ({"messages": [{"role": "user", "content": TOO_LONG}]}, "8001 characters; the limit is 8000"),
    ({"messages": [{"role": "user", "content": "y" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 2 +
      [{"role": "user", "content": "y" * 7000}]}, "35000 characters; the limit is 32000"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles must alternate"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "roles must alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last message must be from the user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "system message may only come first"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "role system, user or assistant"),
    ({"messages": [{"role": "user", "content": "  "}]}, "content is empty"),
    ({"messages": [{"role": "user", "content": 5}]}, "content must be a string"),
    ({"messages": HI, "temperature": 2.5}, "temperature must be in [0.0, 2.0]"),
    ({"messages": HI, "temperature": "hot"}, "temperature must be a number"),
    ({"messages": HI, "top_k": 201}, "top_k must be in [0, 200]"),
    ({"messages": HI, "top_k": 1.5}, "top_k must be an integer"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens must be in [1, 4096]"),
    ({"messages": HI, "max_tokens": 5000}, "max_tokens must be in [1, 4096]"),
    ({"messages": [{"role": "user", "content": "z" * 300}]}, "the model's context is 256"),
    ([1, 2], "must be a JSON object"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_bad_requests_get_400_naming_the_problem(web_server, path):
    for body, reason in BAD_REQUESTS:
        status, text = post(web_server + path, body)
        assert status == 400, (body, text)
        assert reason in json.loads(text)["error"]["message"] and reason in json.loads(text)["detail"], (reason, text)
    status, text = post(web_server + path, b'{"messages": [', raw=True)
    assert status == 400 and "valid JSON" in json.loads(text)["detail"]


def test_openai_only_limits(web_server):
    for body, reason in [({"messages": HI, "n": 2}, "n must be in [1, 1]"), ({"messages": HI, "top_p": 0}, "top_p must be greater than 0"),
                         ({"messages": HI, "stop": ["x"]}, "stop sequences are not supported")]:
        status, text = post(web_server + "/v1/chat/completions", body)
        assert status == 400 and reason in json.loads(text)["detail"], (body, text)


def test_a_client_that_disconnects_frees_its_row(web_server):
    """Hang up after the first event of a ~210-token reply: the server sees it at its next write, and the row is
    freed as cancelled. Rounds of 64 steps can finish the reply first on a loaded machine (then it counts as
    completed, and the hang-up came too late to test anything): up to 3 tries."""
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0.0, "max_tokens": 4000}).encode()
    outcomes = []
    while len(outcomes) < 3 and "cancelled" not in outcomes:
        before = get(web_server + "/stats")
        request = urllib.request.Request(web_server + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
        response = urllib.request.urlopen(request, timeout=60)
        assert response.readline().startswith(b"data: ")
        response.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            stats = get(web_server + "/stats")
            ended = {name: stats[name] - before[name] for name in ("cancelled", "completed")}
            if sum(ended.values()) and stats["busy_slots"] == 0:
                break
            time.sleep(0.2)
        assert sum(ended.values()) == 1 and stats["busy_slots"] == 0, (ended, stats)
        outcomes.append(max(ended, key=ended.get))
    assert outcomes[-1] == "cancelled", outcomes


def test_64_concurrent_streaming_clients(web_server):
    figures = run_load(web_server, clients=64, max_tokens=32)
    print(describe(figures))
    assert figures["errors"] == [] and figures["completed"] == 64
    assert max(figures["batch_sizes"]) == 4  # every row of the batch was used: requests were decoded together
    assert max(figures["prefill_sizes"]) > 1 and sum(k * v for k, v in figures["prefill_sizes"].items()) == 64  # and prefilled together
    assert stream_chat(web_server, "Hi", 64, 0.0)[2] == CHAT_REPLIES["Hi"]  # and the server is still right afterwards


def test_chat_cli_one_shot_and_interactive(chat_export):
    """`python -m pipelines.chat_cli`: one shot with -p, and the interactive loop with clear and quit."""
    import subprocess
    import sys
    from conftest import REPO
    cli = [sys.executable, "-m", "pipelines.chat_cli", "--checkpoint", chat_export, "-t", "0"]
    one = subprocess.run(cli + ["-p", "Hi"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert one.stdout == CHAT_REPLIES["Hi"] + "\n"
    session = subprocess.run(cli, input="Hi\nclear\nHi\nquit\n", cwd=REPO, capture_output=True, text=True, timeout=300)
    assert session.returncode == 0, session.stderr
    assert session.stdout.count("Assistant: " + CHAT_REPLIES["Hi"] + "\n") == 2 and "(new conversation)" in session.stdout
