"""
Load test for a running chat server: N clients stream chats at once through nanochat's protocol.
Prints requests/s, time to first token (p50/p99), the decode batch sizes the scheduler formed, and how many
requests each of its prefills took.

python -m web.loadtest --url http://127.0.0.1:8000 --clients 64 --max-tokens 64
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request


def stream_chat(url, message, max_tokens, temperature):
    """(time to first token, total time, text) of one streamed chat; raises on any error."""
    body = json.dumps({"messages": [{"role": "user", "content": message}], "max_tokens": max_tokens, "temperature": temperature}).encode()
    request = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0, first, text, done = time.perf_counter(), None, [], False
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("done"):
                done = True
                break
            first = first or time.perf_counter()
            text.append(event["token"])
    if not done:
        raise RuntimeError("stream ended without the done event")
    return (first or time.perf_counter()) - t0, time.perf_counter() - t0, "".join(text)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_load(url, clients=64, max_tokens=64, temperature=0.8, messages=("Hi", "Tell me a story")):
    """Start all clients together; returns the figures and the per-client errors."""
    stats_before = json.load(urllib.request.urlopen(url + "/stats"))
    results, errors = [None] * clients, []
    barrier = threading.Barrier(clients)

    def client(i):
        barrier.wait()  # all at once: the scheduler has to batch them
        try:
            results[i] = stream_chat(url, messages[i % len(messages)], max_tokens, temperature)
        except Exception as e:
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    stats = json.load(urllib.request.urlopen(url + "/stats"))
    since = lambda name: {int(k): v - stats_before[name].get(k, 0) for k, v in stats[name].items() if v - stats_before[name].get(k, 0)}
    done = [r for r in results if r is not None]
    ttft = [r[0] for r in done]
    tokens = stats["tokens"] - stats_before["tokens"]  # as the scheduler counts them (stop tokens included)
    streaming = sum(r[1] - r[0] for r in done)  # each client's time from its first token to its last
    return dict(clients=clients, completed=len(done), errors=errors, seconds=elapsed, requests_per_s=len(done) / elapsed,
                ttft_p50=percentile(ttft, 0.5) if ttft else None, ttft_p99=percentile(ttft, 0.99) if ttft else None,
                latency_p50=statistics.median(r[1] for r in done) if done else None,
                chars=sum(len(r[2]) for r in done), tokens=tokens, tokens_per_s=tokens / elapsed,
                client_tokens_per_s=(tokens - len(done)) / streaming if streaming > 0 else None,  # per client, after its first
                batch_sizes=since("batch_sizes"), prefill_sizes=since("prefill_sizes"))


def describe(figures):
    sizes = figures["batch_sizes"]
    steps = sum(sizes.values())
    mean = sum(k * v for k, v in sizes.items()) / max(steps, 1)
    return (f"{figures['completed']}/{figures['clients']} completed, {len(figures['errors'])} errors, {figures['seconds']:.2f} s, "
            f"{figures['requests_per_s']:.2f} req/s | TTFT p50 {figures['ttft_p50'] * 1000:.0f} ms, p99 {figures['ttft_p99'] * 1000:.0f} ms | "
            f"latency p50 {figures['latency_p50']:.2f} s | {figures['tokens']} tokens, {figures['tokens_per_s']:,.0f} tok/s in all, "
            f"{figures['client_tokens_per_s'] or 0:,.0f} tok/s per client after its first | "
            f"{steps} decode steps, mean batch {mean:.1f}, max {max(sizes, default=0)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Concurrent streaming clients against a chat server")
    parser.add_argument("--url", type=str, default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()
    figures = run_load(args.url, args.clients, args.max_tokens, args.temperature)
    print(describe(figures))
    print("batch sizes (rows: steps):", dict(sorted(figures["batch_sizes"].items())))
    print("prefills (requests: calls):", dict(sorted(figures["prefill_sizes"].items())))
    for e in figures["errors"]:
        print(e)
