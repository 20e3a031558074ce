"""
The report card. `reset` wipes old sections and writes a header (git, hardware, versions, code size);
each stage then logs one markdown section; `generate` stitches them in pipeline order into report.md
and ends with a summary table of the headline metrics.

python -m nanochat_jax.report reset      # at the start of a run
python -m nanochat_jax.report generate   # at the end: <base>/report/report.md, copied to the cwd
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections import Counter

from nanochat_jax.common import get_base_dir

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# Sections in pipeline order; each maps to its column of the summary table (None: not summarized).
SECTIONS = {
    "Tokenizer training": None,
    "Tokenizer evaluation": None,
    "Base model training": "BASE",
    "Base model loss": "BASE",
    "Base model evaluation": "BASE",
    "Chat evaluation base": "BASE",
    "Midtraining": "MID",
    "Chat evaluation mid": "MID",
    "Chat SFT": "SFT",
    "Chat evaluation sft": "SFT",
    "Chat RL": "RL",
    "Chat evaluation rl": "RL",
    "Speedrun": None,  # run_speedrun's time table and cost
}
COLUMNS = ["BASE", "MID", "SFT", "RL"]
# nanochat's rows in its order (SpellingBee is v1's sixth chat task), then the bpb figures it leaves to the sections
METRICS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "SpellingBee", "ChatCORE", "val_bpb", "min_val_bpb", "train_bpb"]
VERSIONS = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tiktoken", "numpy"]
CODE_EXTS = (".py", ".rs", ".html", ".md", ".toml")
PEAK_MEMORY = "Peak memory (GiB)"  # the bullet every stage's section carries; run_speedrun's table reads it back


def slugify(section):
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")  # "Chat SFT" -> "chat-sft"


def now():
    return datetime.datetime.now().strftime(TIME_FORMAT)


def fmt(value):
    """Numbers the way a person reads them: 4 decimals, commas on big ints, exponents at the extremes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if value != 0 and not 1e-3 <= abs(value) < 1e6:
        return f"{value:.4e}"  # learning rates, FLOPs
    return f"{value:.4f}"


def run(cmd):
    """stdout of a command in the repo, or None when it is missing or fails (no git, not a checkout)."""
    try:
        return subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None

# -----------------------------------------------------------------------------
# Header: everything needed to tell two runs apart


def git_info():
    commit = run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "branch": run(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown",
        "commit": commit + (" (dirty)" if dirty else ""),
        "message": (run(["git", "log", "-1", "--pretty=%s"]) or "").strip(),
    }


def hardware_info():
    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):  # platform.processor() is often empty or just "x86_64" on Linux
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"platform": platform.platform(), "CPU": f"{cpu} ({os.cpu_count()} cores)"}
    try:
        info["RAM"] = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import jax  # lazily: the CLI should work even where the accelerator backend won't start
        kinds = Counter(d.device_kind for d in jax.devices())
        info["JAX devices"] = ", ".join(f"{n} x {kind}" for kind, n in kinds.items()) + f" (backend {jax.default_backend()})"
    except Exception as e:  # noqa: BLE001 (any backend init failure just goes into the report)
        info["JAX devices"] = f"unavailable ({type(e).__name__})"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip().splitlines()
        for name, n in Counter(out).items():
            info[f"nvidia-smi ({n}x)"] = name
    return info


def software_info():
    info = {"python": platform.python_version()}
    for pkg in VERSIONS:
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    return info


def code_size():
    """Size of the tracked source: the number nanochat calls "bloat" and tries to keep small."""
    files = [f for f in (run(["git", "ls-files"]) or "").splitlines() if f.endswith(CODE_EXTS)]
    chars = lines = 0
    for f in files:
        try:
            text = open(os.path.join(REPO_DIR, f), encoding="utf-8", errors="replace").read()
        except OSError:  # tracked but deleted in the working tree
            continue
        chars, lines = chars + len(text), lines + text.count("\n")
    return {"files": len(files), "lines": lines, "characters": chars, "tokens (approx, chars/4)": chars // 4}


def bullets(data):
    return "\n".join(f"- {k}: {fmt(v)}" for k, v in data.items())


def header():
    parts = [("Git", git_info()), ("Hardware", hardware_info()), ("Software", software_info()), ("Code size", code_size())]
    body = "\n\n".join(f"### {title}\n\n{bullets(info)}" for title, info in parts)
    return f"# nanochat_jax report card\n\nRun started: {now()}\n\n{body}\n"

# -----------------------------------------------------------------------------
# Summary: pull "- key: value" lines back out of the section files


def parse_bullets(text):
    return dict(re.findall(r"^- ([^:\n]+): (.*)$", text, flags=re.M))


def summary(sections):
    """Markdown table, rows METRICS x columns COLUMNS, from {section title: markdown}; later sections win."""
    table = {}
    for title, text in sections.items():
        column = SECTIONS.get(title)
        if column is None:
            continue
        for key, value in parse_bullets(text).items():
            if key in METRICS:
                table[key, column] = value
    rows = [m for m in METRICS if any((m, c) in table for c in COLUMNS)]
    lines = ["| Metric | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + " | ".join([m] + [table.get((m, c), "-") for c in COLUMNS]) + " |" for m in rows]
    return "\n".join(lines) if rows else "(no metrics logged yet)"


def wall_clock(head, sections):
    """Header's "Run started" to the newest section timestamp, as XhYYmZZs; None when either is missing."""
    start = re.search(r"^Run started: (.*)$", head, flags=re.M)
    stamps = [m.group(1) for text in sections.values() for m in re.finditer(r"^timestamp: (.*)$", text, flags=re.M)]
    if not start or not stamps:
        return None
    # max() of the strings is the latest time: TIME_FORMAT is zero-padded, biggest unit first
    start, end = (datetime.datetime.strptime(s.strip(), TIME_FORMAT) for s in (start.group(1), max(stamps)))
    secs = int((end - start).total_seconds())
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m{secs % 60:02d}s"

# -----------------------------------------------------------------------------
# The report object the stages use


class Report:
    def __init__(self, report_dir):
        self.dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def log(self, section, data):
        """(Over)write one section. data: dicts become `- key: value` bullets, strings go in verbatim."""
        blocks = [bullets(item) if isinstance(item, dict) else str(item) for item in data]
        text = f"## {section}\n\ntimestamp: {now()}\n\n" + "\n\n".join(b for b in blocks if b) + "\n"
        path = os.path.join(self.dir, f"{slugify(section)}.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def reset(self):
        """Start a new run: drop every old section and plot, write a fresh header."""
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "header.md"), "w", encoding="utf-8") as f:
            f.write(header())

    def generate(self):
        """Write report.md (header, sections in pipeline order, summary), copy it and its PNGs to the cwd."""
        def read(name):
            with open(os.path.join(self.dir, name), encoding="utf-8") as f:
                return f.read()
        files = set(os.listdir(self.dir))
        head = read("header.md") if "header.md" in files else "# nanochat_jax report card\n\n(no header: run `reset` first)\n"
        known = [slugify(s) + ".md" for s in SECTIONS]
        others = sorted(f for f in files if f.endswith(".md") and f not in known + ["header.md", "report.md"])
        sections = {}
        for name in [k for k in known if k in files] + others:
            text = read(name)
            title = text.splitlines()[0].removeprefix("## ").strip() if text else name
            sections[title] = text
        clock = wall_clock(head, sections)
        tail = f"## Summary\n\n{summary(sections)}\n" + (f"\nTotal wall clock time: {clock}\n" if clock else "")
        path = os.path.join(self.dir, "report.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join([head] + list(sections.values()) + [tail]))
        cwd = os.getcwd()
        if os.path.realpath(cwd) != os.path.realpath(self.dir):
            for name in ["report.md"] + sorted(f for f in files if f.endswith(".png")):  # so image links resolve from the cwd too
                shutil.copy(os.path.join(self.dir, name), os.path.join(cwd, name))
        return path


class DummyReport:
    """Stands in on every process but the first, so stages can log unconditionally."""
    dir = None

    def log(self, section, data):
        pass

    def reset(self):
        pass

    def generate(self):
        pass


def get_report():
    # Only process 0 writes. jax is consulted only if the caller already imported it (the CLI never does).
    if "jax" in sys.modules and sys.modules["jax"].process_index() != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))

# -----------------------------------------------------------------------------
# Training curves


def plot_metrics(metrics_path, out_png, ema_beta=0.9, title="base model training", val_key="val_bpb", val_label="val bits per byte",
                 train_key="loss", train_label="train loss (nats/token)"):
    """Train loss (raw + EMA; RL: the reward) and a val metric (bpb; SFT: val loss; RL: pass@1) vs step from a
    metrics.jsonl, as a PNG. Returns out_png."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display on training nodes
    from matplotlib.figure import Figure  # not pyplot, so no global figure state leaks into the stage
    rows = [json.loads(line) for line in open(metrics_path, encoding="utf-8") if line.strip()]
    train = [(r["step"], r[train_key]) for r in rows if r.get(train_key) is not None]
    val = [(r["step"], r[val_key]) for r in rows if r.get(val_key) is not None]
    # Two panels, not a twin axis: loss is nats per token, bpb is bits per byte, and they share only the x axis.
    fig = Figure(figsize=(8, 6 if val else 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if val else 1, 1, sharex=True, squeeze=False)[:, 0]
    if train:
        steps, losses = zip(*train)
        ema, smooth = 0.0, []
        for i, x in enumerate(losses):
            ema = ema_beta * ema + (1 - ema_beta) * x
            smooth.append(ema / (1 - ema_beta ** (i + 1)))  # debiased, else the curve starts near 0
        axes[0].plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label=train_label.split(" (")[0])
        axes[0].plot(steps, smooth, color="tab:blue", lw=2, label=f"EMA (beta={ema_beta})")
        axes[0].legend(loc="upper right")
    axes[0].set_ylabel(train_label)
    axes[0].set_title(title)
    if val:
        steps, bpbs = zip(*val)
        axes[1].plot(steps, bpbs, color="tab:orange", marker="o", lw=2, label=val_label)
        axes[1].annotate(f"{bpbs[-1]:.4f}", (steps[-1], bpbs[-1]), textcoords="offset points", xytext=(-10, 8), ha="right")
        axes[1].set_ylabel(val_label)
        axes[1].legend(loc="upper right")
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.savefig(out_png, dpi=120)
    return out_png


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="nanochat_jax report card")
    parser.add_argument("command", choices=["generate", "reset"], help="reset: new header, old sections gone; generate: write report.md")
    args = parser.parse_args()
    report = get_report()
    if args.command == "reset":
        report.reset()
        print(f"report reset: {os.path.join(report.dir, 'header.md')}")
    else:
        path = report.generate()
        print(f"report written to {path} (and copied to {os.path.join(os.getcwd(), 'report.md')})")
