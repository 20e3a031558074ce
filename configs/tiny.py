"""tiny: the whole pipeline on a laptop CPU in minutes, on the embedded State of the Union corpus."""

tok_train = dict(vocab_size=8192, max_chars=20_000_000)  # the embedded corpus has ~12M characters of train text
