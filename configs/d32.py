"""d32: nanochat's $1000 tier (1.9B params), run1000.sh."""

tok_train = dict(vocab_size=65536, max_chars=4_000_000_000)  # run1000.sh trains the tokenizer on 4B characters
