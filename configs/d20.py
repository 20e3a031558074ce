"""d20: nanochat's $100 speedrun model (561M params), 8 GPUs for ~4 hours."""

data = dict(num_shards=240)  # FineWeb-Edu shards to download (~100 MB each), as nanochat

tok_train = dict(vocab_size=65536, max_chars=2_000_000_000)  # 2^16 tokens on 2B characters, as speedrun.sh

# speedrun.sh: 524,288 tokens per step (grad_accum 1 on 8 GPUs at batch 32), 20 tokens per parameter -> 21,400 steps
base_train = dict(depth=20, max_seq_len=2048, device_batch_size=32, total_batch_size=524_288,
                  matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, warmdown_ratio=0.2, target_param_data_ratio=20)
