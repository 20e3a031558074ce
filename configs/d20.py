"""d20: nanochat's $100 speedrun model (561M params), 8 GPUs for ~4 hours."""

tok_train = dict(vocab_size=65536, max_chars=2_000_000_000)  # 2^16 tokens on 2B characters, as speedrun.sh
