"""d26: nanochat's $300 tier (1.1B params), roughly GPT-2 grade CORE."""

tok_train = dict(vocab_size=65536, max_chars=2_000_000_000)  # same tokenizer as the speedrun
