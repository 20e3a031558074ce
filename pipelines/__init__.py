"""One module per pipeline stage, each run as `python -m pipelines.<stage>`."""
