"""d26: nanochat's $300 tier (1.1B params), roughly GPT-2 grade CORE."""

data = dict(num_shards=450)  # FineWeb-Edu shards to download (~100 MB each), as nanochat

tok_train = dict(vocab_size=65536, max_chars=2_000_000_000)  # same tokenizer as the speedrun

# batch 32 runs out of memory at d26 on 80 GB: 16 with grad_accum 2 on 8 GPUs -> 41,275 steps
base_train = dict(depth=26, max_seq_len=2048, device_batch_size=16, total_batch_size=524_288,
                  matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, warmdown_ratio=0.2, target_param_data_ratio=20)
