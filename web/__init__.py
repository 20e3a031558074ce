"""The Flask chat server and its UI. Not written yet: they arrive with the inference issue."""
