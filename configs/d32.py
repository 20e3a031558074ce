"""d32: nanochat's $1000 tier (1.9B params), run1000.sh."""

data = dict(num_shards=800)  # FineWeb-Edu shards to download (~100 MB each), as nanochat

tok_train = dict(vocab_size=65536, max_chars=4_000_000_000)  # run1000.sh trains the tokenizer on 4B characters

# run1000.sh: batch 8 (16 runs out of memory), grad_accum 4 on 8 GPUs -> 71,680 steps
base_train = dict(depth=32, max_seq_len=2048, device_batch_size=8, total_batch_size=524_288,
                  matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, warmdown_ratio=0.2, target_param_data_ratio=20)
