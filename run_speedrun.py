"""
Run the whole pipeline for one tier, stage by stage, each stage in its own process
(like nanochat's speedrun.sh). Flags per stage come from configs/<tier>.py. A stage whose output
already exists is skipped, so a speedrun that was interrupted continues where it stopped.

python run_speedrun.py --tier=tiny                      # CPU, minutes, embedded corpus
python run_speedrun.py --tier=d20 --data-dir DIR        # GPUs
python run_speedrun.py --tier=d20 --rehearsal --data-dir DIR --tasks-dir DIR --eval-bundle ZIP   # every stage, a few steps
"""
import argparse
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

# Stages in pipeline order. RL and its chat eval run where the tier configures them (tiny: SpellingBee, offline)
# or with --rl, as nanochat runs them only on request.
STAGES = ["data", "eval_bundle", "tok_train", "tok_eval", "base_train", "base_loss", "base_eval",
          "mid_train", "chat_eval_mid", "chat_sft", "chat_eval_sft", "chat_rl", "chat_eval_rl"]
RL_STAGES = {"chat_rl", "chat_eval_rl"}
DATA_STAGES = {"tok_train", "tok_eval", "base_train", "base_loss"}  # stages that read the pretraining shards
INPUT_STAGES = {"data", "eval_bundle"}  # stages that fetch inputs and write no report section
TRAINING = {"base_train": "base", "mid_train": "mid", "chat_sft": "sft", "chat_rl": "rl"}  # stage -> its checkpoints' stage name
# Stages that run as a group of processes when JAX_NUM_PROCESSES is set; chat_rl and chat_eval decode on one
# device, and the data and tokenizer stages use no accelerator, so they stay one process.
PROCESS_GROUP = {"base_train", "base_loss", "base_eval", "mid_train", "chat_sft"}
SECTIONS = {"tok_train": "tokenizer-training", "tok_eval": "tokenizer-evaluation",  # stage -> its report section's file
            "base_train": "base-model-training", "base_loss": "base-model-loss", "base_eval": "base-model-evaluation",
            "mid_train": "midtraining", "chat_eval_mid": "chat-evaluation-mid", "chat_sft": "chat-sft",
            "chat_eval_sft": "chat-evaluation-sft", "chat_rl": "chat-rl", "chat_eval_rl": "chat-evaluation-rl"}
CHAT_STAGES = {"mid_train", "chat_sft", "chat_rl", "chat_eval_mid", "chat_eval_sft", "chat_eval_rl"}  # stages that read the chat tasks


def base_dir():
    from nanochat_jax.common import get_base_dir
    return get_base_dir()


def report_path(name):
    """A file in the report directory, where each stage's section and the stage times live."""
    return os.path.join(base_dir(), "report", name)


def base_tag(config):
    return f"d{config.base_train['depth']}"


# --rehearsal: every stage at the tier's shapes for a few steps (S), offline, on small eval subsets. It proves the whole
# path on one GPU in minutes and measures the step times that docs/performance.md extrapolates to a full run.
def rehearsal_flags(stage, S):
    return {"data": dict(num_shards=4) if "num_shards" in config.data else {},  # 3 train shards and the val, unless --data-dir
            "tok_eval": dict(download_timeout=3),
            "base_train": dict(num_iterations=S, eval_every=-1, eval_tokens=524_288, sample_every=-1, core_metric_every=-1, save_every=-1),
            "base_loss": dict(split_tokens=524_288),
            "base_eval": dict(max_per_task=20),
            "mid_train": dict(mixture="offline", num_iterations=S, eval_every=-1, eval_tokens=524_288),
            "chat_sft": dict(mixture="offline", num_iterations=2 * S, eval_every=-1, eval_steps=4, eval_metrics_every=-1,
                             eval_metrics_max_problems=64),
            "chat_rl": dict(task="GSM8K" if args.tasks_dir else "SpellingBee", num_iterations=S, eval_every=-1, eval_examples=16),
            "chat_eval": dict(max_problems=24, max_new_tokens=256)}.get(stage, {})


def done(stage, config):
    """The stage's output exists: its report section (written when it finishes), or for data the shards."""
    base = base_dir()
    if stage == "data":
        return args.data_dir is not None or (config.data.get("embedded") and os.path.isdir(os.path.join(base, "base_data_sotu")))
    if stage == "eval_bundle":  # CORE's tasks, for base_train's CORE metric and base_eval
        return args.eval_bundle is not None or os.path.isfile(os.path.join(base, "eval_bundle", "core.yaml"))
    return os.path.isfile(section_path(stage))


def section_path(stage):
    return report_path(SECTIONS[stage] + ".md")


parser = argparse.ArgumentParser(description="Run the nanochat_jax pipeline for one tier")
parser.add_argument("--tier", type=str, default="tiny", choices=["tiny", "d20", "d26", "d32"], help="configs/<tier>.py")
parser.add_argument("--data-dir", type=str, default=None, help="parquet shards (default: the embedded corpus)")
parser.add_argument("--eval-bundle", type=str, default=None, help="CORE eval bundle, a zip or directory (default: downloaded, except on the offline tiny tier)")
parser.add_argument("--tasks-dir", type=str, default=None, help="local chat task data (gzip JSON lines) for mid, SFT and the chat evals")
parser.add_argument("--rl", action=argparse.BooleanOptionalAction, default=None,
                    help="run chat_rl and its chat eval (default: where the tier configures chat_rl, as tiny does)")
parser.add_argument("--rehearsal", action="store_true", help="every stage (RL too) for a few steps at the tier's shapes, offline")
parser.add_argument("--rehearsal-steps", type=int, default=6, help="optimizer steps per training stage in --rehearsal (SFT: twice)")
parser.add_argument("--gpu-hourly-rate", type=float, default=None,
                    help="$ per GPU per hour for the cost estimate (default: nanochat's, H100 3.00, A100 1.79, V100 0.55, else 2.00)")
parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
args = parser.parse_args()
config = importlib.import_module(f"configs.{args.tier}")
num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
if num_processes > 1 and "JAX_PROCESS_ID" in os.environ:
    sys.exit("run_speedrun.py starts the processes of this host itself (JAX_NUM_PROCESSES=N, no JAX_PROCESS_ID); "
             "for several hosts, launch each stage on every host as the README's 'Several GPUs, several processes' says")
if args.rehearsal:  # a home of its own: the rehearsal's finished stages must not count as the real run's
    os.environ["NANOCHAT_JAX_HOME"] = os.path.join(base_dir(), f"rehearsal_{args.tier}")


def stage_command(stage):
    flags = dict(getattr(config, stage, {}))
    if stage.startswith("chat_eval_"):  # chat_eval_mid, chat_eval_sft: chat_eval's flags, on that stage's model
        flags = dict(getattr(config, "chat_eval", {}), source=stage.removeprefix("chat_eval_"))
    if args.rehearsal:
        flags.update(rehearsal_flags("chat_eval" if stage.startswith("chat_eval_") else stage, args.rehearsal_steps))
    if stage in CHAT_STAGES and args.tasks_dir:
        flags["tasks_dir"] = os.path.abspath(args.tasks_dir)
    if stage in DATA_STAGES and args.data_dir:
        flags["data_dir"] = args.data_dir
    if stage == "base_train":  # base_train reads the tier's config itself; only the overrides go on its command line
        flags = {"tier": args.tier, **{k: v for k, v in flags.items() if k not in config.base_train or flags[k] != config.base_train[k]}}
    if stage in ("base_loss", "base_eval", "mid_train", "chat_sft", "chat_rl") or stage.startswith("chat_eval"):
        flags["tag"] = base_tag(config)
    if stage in ("base_train", "base_eval") and args.eval_bundle:
        flags["eval_bundle"] = os.path.abspath(args.eval_bundle)
    if stage == "eval_bundle":
        return [sys.executable, "-m", "pipelines.base_eval", "--download-only"]
    if stage in TRAINING and has_checkpoint(TRAINING[stage]):
        flags["resume"] = True  # an interrupted run continues from its latest checkpoint
    module = "pipelines.chat_eval" if stage.startswith("chat_eval") else {"data": "nanochat_jax.dataset"}.get(stage, f"pipelines.{stage}")
    cmd = [sys.executable, "-m", module]
    for key, value in flags.items():
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return cmd


def has_checkpoint(stage):
    """Has an interrupted run of this training stage left a checkpoint (orbax names each by its step)?"""
    run_dir = os.path.join(base_dir(), f"{stage}_checkpoints", base_tag(config))
    return os.path.isdir(run_dir) and any(name.isdigit() for name in os.listdir(run_dir))


def unavailable(stage, config):
    """Why a stage cannot run here, or None. The tiny tier runs offline: it never downloads the CORE
    bundle, so without --eval-bundle (or a bundle downloaded before) eval_bundle and base_eval are left out."""
    if stage in ("eval_bundle", "base_eval") and config.data.get("embedded") and not done("eval_bundle", config):
        return ("no CORE eval bundle, and the tiny tier downloads nothing: pass --eval-bundle PATH (a bundle zip or directory), "
                "or fetch nanochat's once with python -m pipelines.base_eval --download-only")
    return None


def gpus():
    """(count, name) of the host's NVIDIA GPUs from nvidia-smi, or (0, None). Not through jax: a backend started in
    this process would hold GPU memory for the whole run, under every stage."""
    if not shutil.which("nvidia-smi"):
        return 0, None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.split("\n")
    names = [n.strip() for n in out if n.strip()]
    return len(names), (names[0] if names else None)


def hourly_rate(gpu_name):
    """nanochat's per-GPU hourly rates, by the GPU's name."""
    if args.gpu_hourly_rate is not None:
        return args.gpu_hourly_rate
    return next((rate for kind, rate in (("H100", 3.00), ("A100", 1.79), ("V100", 0.55)) if kind in (gpu_name or "")), 2.00)


def times_path():
    return report_path("stage_times.json")


def read_times():
    try:
        with open(times_path()) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def record_time(stage, seconds):
    """Keep each stage's wall time beside the report sections (a rerun that skips a stage keeps its time)."""
    times = dict(read_times(), **{stage: round(seconds, 1)})
    tmp = times_path() + ".tmp"
    with open(tmp, "w") as f:
        json.dump(times, f, indent=1)
    os.replace(tmp, times_path())  # a half-written file never replaces a good one


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_stage(stage, cmd):
    """Run a stage to its end and return its exit code. With JAX_NUM_PROCESSES=N, a PROCESS_GROUP stage runs as N
    local processes around one coordinator, the host's GPUs split evenly between them; when one fails the others
    are stopped, since they would wait for it in a collective."""
    if num_processes <= 1 or stage not in PROCESS_GROUP:
        return subprocess.run(cmd).returncode
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu_ids = visible.split(",") if visible else [str(i) for i in range(gpus()[0])]
    if gpu_ids and len(gpu_ids) % num_processes:
        sys.exit(f"JAX_NUM_PROCESSES={num_processes} does not divide the host's {len(gpu_ids)} GPUs")
    per, address = len(gpu_ids) // num_processes, f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(num_processes):
        env = dict(os.environ, JAX_PROCESS_ID=str(i), JAX_COORDINATOR_ADDRESS=address)
        if gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids[i * per:(i + 1) * per])
        procs.append(subprocess.Popen(cmd, env=env))
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c == 0 for c in codes):
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            return failed[0] if failed else 0
        time.sleep(1)


def peak_memory(stage):
    """The peak device memory the stage's report section records, or '-'."""
    from nanochat_jax.report import PEAK_MEMORY, parse_bullets
    try:
        with open(section_path(stage)) as f:
            return parse_bullets(f.read()).get(PEAK_MEMORY, "-")
    except (OSError, KeyError):
        return "-"


def speedrun_section(left_out):
    """The report's "Speedrun" section: the time and memory table, the GPU-hours and their cost."""
    from nanochat_jax.report import get_report
    times = read_times()
    rows = ["| stage | seconds | peak memory (GiB) |", "|---|---|---|"]
    for stage in STAGES:
        seconds = times.get(stage)
        rows.append(f"| {stage} | {'left out' if stage in left_out else '-' if seconds is None else f'{seconds:,.1f}'} | {peak_memory(stage)} |")
    total = sum(times.get(stage, 0.0) for stage in STAGES)
    n_gpus, gpu_name = gpus()
    info = {"tier": args.tier, "rehearsal": args.rehearsal, "stages' time": f"{total:,.1f}s ({total / 3600:.2f}h)"}
    if n_gpus:
        rate = hourly_rate(gpu_name)
        info.update({"GPUs": f"{n_gpus} x {gpu_name}", "GPU hourly rate": f"${rate:.2f}",
                     "estimated cost": f"${n_gpus * rate * total / 3600:,.2f} ({n_gpus} GPUs x {total / 3600:.2f}h x ${rate:.2f})"})
    else:
        info["estimated cost"] = "- (no GPU)"
    get_report().log("Speedrun", [info, "\n".join(rows)])


t_start, left_out, ran = time.time(), [], []
run_rl = args.rl if args.rl is not None else (args.rehearsal or hasattr(config, "chat_rl"))
if not run_rl:
    STAGES = [stage for stage in STAGES if stage not in RL_STAGES]
if not args.dry_run:
    # a fresh run (no stage has written its report section yet): new header (date, commit, hardware).
    # data and eval_bundle count as done when given on the command line, so they say nothing about that.
    # In a child process: the header asks jax for the devices, and a backend started here would keep its GPU memory
    if not any(done(stage, config) for stage in STAGES if stage not in INPUT_STAGES):
        subprocess.run([sys.executable, "-m", "nanochat_jax.report", "reset"], check=True)
for stage in STAGES:
    cmd = stage_command(stage)
    if done(stage, config):
        print(f"\n=== {stage}: already done, skipping (delete its report section to redo it)", flush=True)
        continue
    if (why := unavailable(stage, config)):
        print(f"\n=== {stage}: left out: {why}", flush=True)
        left_out.append(stage)
        continue
    group = f" ({num_processes} processes)" if num_processes > 1 and stage in PROCESS_GROUP else ""
    print(f"\n=== {stage}{group}: {' '.join(cmd[1:])}", flush=True)
    if args.dry_run:
        continue
    t0 = time.time()
    code = run_stage(stage, cmd)
    if code != 0:
        sys.exit(f"stage {stage} failed (exit code {code}); later stages were not run")
    record_time(stage, time.time() - t0)
    ran.append(stage)
    print(f"=== {stage} done in {time.time() - t0:.1f}s", flush=True)
if not args.dry_run:
    from nanochat_jax.report import get_report
    if ran or not os.path.isfile(report_path("speedrun.md")):
        speedrun_section(left_out)  # a rerun that ran nothing keeps it, and with it the run's wall clock
    print(f"\nreport card: {get_report().generate()}")
print(f"\nall stages done in {time.time() - t_start:.1f}s" + (f" (left out: {', '.join(left_out)})" if left_out else ""))
