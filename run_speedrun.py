"""
Run the whole pipeline for one tier, stage by stage, each stage in its own process
(like nanochat's speedrun.sh). Flags per stage come from configs/<tier>.py.

python run_speedrun.py --tier=tiny                      # CPU, minutes, embedded corpus
python run_speedrun.py --tier=d20 --data-dir DIR        # GPUs
"""
import argparse
import importlib
import subprocess
import sys
import time

# Stages in pipeline order. Pretraining, mid/SFT/RL, evals and the report join this list as they land.
STAGES = ["tok_train", "tok_eval"]
DATA_STAGES = {"tok_train", "tok_eval"}  # stages that read the pretraining shards

parser = argparse.ArgumentParser(description="Run the nanochat_jax pipeline for one tier")
parser.add_argument("--tier", type=str, default="tiny", choices=["tiny", "d20", "d26", "d32"], help="configs/<tier>.py")
parser.add_argument("--data-dir", type=str, default=None, help="parquet shards (default: the embedded corpus)")
parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
args = parser.parse_args()
config = importlib.import_module(f"configs.{args.tier}")


def stage_command(stage):
    flags = dict(getattr(config, stage, {}))
    if stage in DATA_STAGES and args.data_dir:
        flags["data_dir"] = args.data_dir
    cmd = [sys.executable, "-m", f"pipelines.{stage}"]
    for key, value in flags.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


t_start = time.time()
for stage in STAGES:
    cmd = stage_command(stage)
    print(f"\n=== {stage}: {' '.join(cmd[1:])}", flush=True)
    if args.dry_run:
        continue
    t0 = time.time()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        sys.exit(f"stage {stage} failed (exit code {result.returncode}); later stages were not run")
    print(f"=== {stage} done in {time.time() - t0:.1f}s", flush=True)
print(f"\nall stages done in {time.time() - t_start:.1f}s")
