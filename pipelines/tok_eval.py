"""
Compare our tokenizer's compression (bytes per token, higher is better) with GPT-2's and GPT-4's
on a few hand-written texts (news, korean, code, math, science) and on the first row group of the
train and val shards. tiktoken fetches gpt2/cl100k_base from the internet on first use; offline
(and with nothing in $TIKTOKEN_CACHE_DIR) only our column is shown.

python -m pipelines.tok_eval
python -m pipelines.tok_eval --data-dir /path/to/shards
"""
import argparse
import threading

import tiktoken

from nanochat_jax.report import get_report
from nanochat_jax.tokenizer import get_tokenizer

parser = argparse.ArgumentParser(description="bytes-per-token comparison of our tokenizer vs GPT-2 / GPT-4")
parser.add_argument("--data-dir", type=str, default=None, help="directory of parquet shards (default: the dataset module's own)")
parser.add_argument("--download-timeout", type=float, default=15.0, help="seconds to wait for tiktoken to fetch gpt2/cl100k_base")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# hand-written samples, a few hundred to ~1500 bytes each

news_text = """
HARBOR CITY - The municipal council voted 7 to 2 on Tuesday night to rebuild the old ferry terminal on
Pier 4, ending a debate that had dragged on for almost three years. The plan, estimated at $48.6 million,
replaces the rusting steel shed with a two-story hall, a covered bike park and a small market for local
fishermen. Construction is expected to begin next spring and to last roughly eighteen months.

"We have patched that building for longer than most of our staff have worked here," said deputy mayor
Elena Ruiz, who championed the proposal. "At some point the patches cost more than the roof."

Opponents argued that the city should first repair the seawall along Front Street, which flooded twice
last winter. Councilor Marcus Webb called the vote "a shiny project chosen over a boring necessity" and
asked staff to report back within 90 days on the seawall's condition. The council agreed to that request
unanimously.

Ferry ridership has grown by about 12% a year since 2021, according to the transit authority, and
weekday crossings now carry some 6,400 passengers. Commuters interviewed at the terminal on Wednesday
morning were mostly relieved. "Anything with heating would be an improvement," said one nurse who rides
the 6:15 boat every day. During construction, boats will dock at a temporary platform on Pier 2.
""".strip()

korean_text = """
작은 마을의 도서관은 매주 토요일 아침마다 어린이들을 위한 이야기 시간을 연다. 자원봉사자들은 그림책을
크게 읽어 주고, 아이들은 바닥에 둥글게 앉아 다음 장면을 맞혀 본다. 올해 봄부터는 할머니와 할아버지들도
참여하기 시작했는데, 옛날 동네에서 있었던 일을 들려주는 시간이 특히 인기가 많다. 도서관 관계자는
"책을 빌리러 오는 사람보다 이야기를 들으러 오는 사람이 더 늘었다"며 웃었다.
""".strip()

code_text = '''
import heapq
from collections import defaultdict


def shortest_paths(graph, source):
    """Dijkstra on a dict-of-dicts graph; returns {node: (distance, previous node)}."""
    best = {source: (0, None)}
    frontier = [(0, source)]
    while frontier:
        dist, node = heapq.heappop(frontier)
        if dist > best[node][0]:
            continue  # stale entry, a shorter path was found after this one was pushed
        for neighbor, weight in graph.get(node, {}).items():
            candidate = dist + weight
            if neighbor not in best or candidate < best[neighbor][0]:
                best[neighbor] = (candidate, node)
                heapq.heappush(frontier, (candidate, neighbor))
    return best


def build_graph(edges):
    graph = defaultdict(dict)
    for a, b, w in edges:
        graph[a][b] = w
        graph[b][a] = w
    return graph


if __name__ == "__main__":
    g = build_graph([("A", "B", 4), ("A", "C", 1), ("C", "B", 2), ("B", "D", 5)])
    for node, (d, prev) in sorted(shortest_paths(g, "A").items()):
        print(f"{node}: distance={d:>3} via {prev}")
'''.strip()

math_text = r"""
\begin{theorem}[Cauchy--Schwarz]
For vectors $u, v$ in a real inner product space $V$ we have
\[
  |\langle u, v \rangle| \le \|u\| \, \|v\|,
\]
with equality if and only if $u$ and $v$ are linearly dependent.
\end{theorem}

\begin{proof}
If $v = 0$ both sides vanish. Otherwise, for every $t \in \mathbb{R}$,
\begin{align}
  0 \le \|u - t v\|^2 &= \langle u - tv, u - tv \rangle \\
                      &= \|u\|^2 - 2t \langle u, v \rangle + t^2 \|v\|^2 .
\end{align}
The right-hand side is a quadratic polynomial $p(t)$ that never takes negative values, so its
discriminant satisfies $\Delta = 4\langle u, v\rangle^2 - 4\|u\|^2 \|v\|^2 \le 0$. Taking square roots
gives the inequality. Choosing $t^\ast = \langle u, v \rangle / \|v\|^2$ shows that equality forces
$u = t^\ast v$.
\end{proof}

As a corollary, for real numbers $a_1, \dots, a_n$ and $b_1, \dots, b_n$,
$\left( \sum_{i=1}^{n} a_i b_i \right)^2 \le \left( \sum_{i=1}^{n} a_i^2 \right) \left( \sum_{i=1}^{n} b_i^2 \right)$,
and for integrable functions $\int_0^1 f g \, dx \le \sqrt{\int_0^1 f^2 \, dx} \sqrt{\int_0^1 g^2 \, dx}$.
""".strip()

science_text = """
Tardigrades, often called water bears, are microscopic animals about half a millimetre long that live
in moss, lichen and sediment all over the planet. When their surroundings dry out, many species enter
a state called anhydrobiosis: they pull in their legs, lose almost all of their body water and slow
their metabolism to less than 0.01% of its normal rate. In this "tun" form they can survive
temperatures close to absolute zero, pressures several times higher than at the bottom of the ocean,
and doses of ionizing radiation that would kill most other animals. Researchers have identified a
family of disordered proteins that appear to form a glass-like matrix inside their cells, protecting
membranes and enzymes until water returns. Another protein, nicknamed Dsup, binds to DNA and seems to
reduce damage from radiation and reactive oxygen species. Understanding these mechanisms could help
with storing vaccines and other biological materials without refrigeration.
""".strip()

all_text = [("news", news_text), ("korean", korean_text), ("code", code_text), ("math", math_text), ("science", science_text)]

# first row group of the train and val shards, if the data is there
try:
    from nanochat_jax.dataset import parquets_iter_batched
    for split in ("train", "val"):
        rows = next(parquets_iter_batched(split, data_dir=args.data_dir))
        all_text.append((f"{split}-shard", "\n".join(rows)))
except Exception as e:  # missing shards, or the dataset module itself
    print(f"shard rows unavailable, skipping the train/val shard rows ({type(e).__name__}: {e})")

# -----------------------------------------------------------------------------
# tokenizers: ours, plus gpt2 / cl100k_base if tiktoken can load them


def load_tiktoken(name, timeout):
    """tiktoken.get_encoding in a daemon thread, so a network that drops packets cannot hang us."""
    result = {}
    def target():
        try:
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return result.get("enc"), result.get("error", f"timed out after {timeout:.0f}s")


tokenizers = {"ours": get_tokenizer()}
for label, name in [("gpt2", "gpt2"), ("gpt4", "cl100k_base")]:
    enc, error = load_tiktoken(name, args.download_timeout)
    if enc is None:
        print(f"GPT-2/GPT-4 comparisons are unavailable offline: could not load tiktoken '{name}' ({error}); "
              f"set TIKTOKEN_CACHE_DIR to a cache that has it. Showing only our tokenizer.")
        tokenizers = {"ours": tokenizers["ours"]}
        break
    tokenizers[label] = enc

# -----------------------------------------------------------------------------
# table


def count_tokens(name, text):
    if name == "ours":
        return len(tokenizers["ours"].encode(text))
    return len(tokenizers[name].encode_ordinary(text))  # ordinary: texts may contain "<|endoftext|>"


baselines = [b for b in ("gpt2", "gpt4") if b in tokenizers]
columns = [f"{b} b/tok" for b in baselines] + ["ours b/tok"] + [f"vs {b}" for b in baselines]
header = f"{'text':<10} {'bytes':>10} " + " ".join(f"{c:>11}" for c in columns)
print(f"vocab size of ours: {tokenizers['ours'].get_vocab_size():,}")
print("b/tok = bytes per token (higher = better compression); vs X = % fewer tokens than X (positive = ours is better)")
lines = [header, "-" * len(header)]
for label, text in all_text:
    num_bytes = len(text.encode("utf-8"))
    tokens = {name: count_tokens(name, text) for name in ["ours"] + baselines}
    cells = [f"{num_bytes / tokens[b]:>11.2f}" for b in baselines] + [f"{num_bytes / tokens['ours']:>11.2f}"]
    cells += [f"{100 * (tokens[b] - tokens['ours']) / tokens[b]:>+10.1f}%" for b in baselines]
    lines.append(f"{label:<10} {num_bytes:>10,} " + " ".join(cells))
print("\n".join(lines))
get_report().log("Tokenizer evaluation", [f"vocab size {tokenizers['ours'].get_vocab_size():,}; bytes per token:", "```\n" + "\n".join(lines) + "\n```"])
