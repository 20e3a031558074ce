"""tiny: the whole pipeline on a laptop CPU in minutes, on the embedded State of the Union corpus."""

tok_train = dict(vocab_size=8192, max_chars=20_000_000)  # the embedded corpus has ~12M characters of train text

# A 4-layer model (D=256, 2 heads of 128) on 256-token rows, like nanochat v1's dev/runcpu.sh in spirit
base_train = dict(depth=4, max_seq_len=256, device_batch_size=16, total_batch_size=4096,
                  matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, warmdown_ratio=0.2, num_iterations=200)
