"""pipelines.mid_train end to end on a small base run: one epoch of the offline mixture, counted up front, with
nanochat's schedule (constant, then linear to 0 over the last 20%), a report section naming every source, and
a resume from a checkpoint that reproduces the uninterrupted run's losses bit for bit."""
import shutil

import pytest

from conftest import copy_of_base_run, metrics_rows, run_stage

FLAGS = ["--tag", "d2", "--mixture", "offline", "--mixture-fraction", "0.002", "--device-batch-size", "4",
         "--total-batch-size", "256", "--eval-every", "5", "--eval-tokens", "512"]


@pytest.fixture(scope="module")
def home(run_dir, tmp_path_factory):
    return copy_of_base_run(run_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def full_run(home):
    """One uninterrupted midtraining run: (its console output, its metrics rows, its report section)."""
    out = run_stage(home, "pipelines.mid_train", *FLAGS)
    rows = metrics_rows(home / "mid_checkpoints" / "d2" / "metrics.jsonl")
    return out, rows, (home / "report" / "midtraining.md").read_text()


def test_one_epoch_with_nanochats_schedule_and_a_report_section(full_run):
    out, rows, section = full_run
    steps = int(out.split(" steps (counted")[0].rsplit("-> ", 1)[1])
    lrm = [r["lrm"] for r in rows if "loss" in r]
    assert len(lrm) == steps > 10
    decay_from = steps - round(0.2 * steps)
    assert all(m == 1.0 for m in lrm[:decay_from + 1]) and lrm[-1] == pytest.approx(1 / round(0.2 * steps))
    assert all(a > b > 0 for a, b in zip(lrm[decay_from:], lrm[decay_from + 1:]))  # to 0, which step `steps` would use
    assert [r["momentum"] for r in rows if "loss" in r][0] == 0.85  # a fresh Muon: its momentum ramp starts over
    val = [r["val_bpb"] for r in rows if "val_bpb" in r]
    assert len(val) == len(range(0, steps, 5)) + 1 and val[-1] < val[0]
    for source in ("identity conversations: 300", "SimpleSpelling: 4", "SpellingBee: 2", "chitchat train: 66", "chitchat test: 1,629"):
        assert source in section
    assert "Mixture: offline" in section and "mid_train_curves.png" in section


def test_resume_reproduces_the_uninterrupted_run(home, full_run):
    shutil.rmtree(home / "mid_checkpoints" / "d2")
    run_stage(home, "pipelines.mid_train", *FLAGS, "--max-steps", "6", "--save-every", "6")
    assert (home / "mid_checkpoints" / "d2" / "6").is_dir()
    out = run_stage(home, "pipelines.mid_train", *FLAGS, "--resume")
    assert "resumed from step 6" in out
    rows = metrics_rows(home / "mid_checkpoints" / "d2" / "metrics.jsonl")
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in full_run[1]]  # every float digit: same batches, same state
    assert [r.get("val_bpb") for r in rows] == [r.get("val_bpb") for r in full_run[1]]


def test_more_iterations_than_one_epoch_stop_where_the_data_ends(home, full_run):
    """nanochat stops midtraining when its cursor wraps: --num-iterations past the epoch finishes at the epoch's
    end, evaluating and saving there, instead of dying in the loader."""
    shutil.rmtree(home / "mid_checkpoints" / "d2")
    steps = len([r for r in full_run[1] if "loss" in r])
    out = run_stage(home, "pipelines.mid_train", *FLAGS, "--num-iterations", "1000", "--eval-every", "-1")
    assert f"the mixture's epoch ended at step {steps} of 1000: finishing here" in out
    rows = metrics_rows(home / "mid_checkpoints" / "d2" / "metrics.jsonl")
    assert len([r for r in rows if "loss" in r]) == steps and rows[-1] == {"step": steps, "val_bpb": rows[-1]["val_bpb"]}
    assert (home / "mid_checkpoints" / "d2" / str(steps)).is_dir()
