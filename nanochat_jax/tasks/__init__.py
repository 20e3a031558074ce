"""
Chat tasks: datasets of conversations for midtraining, SFT, RL and the chat evals, one module per
dataset family as in nanochat's tasks/ (arc, mmlu, gsm8k, humaneval, spellingbee, smoltalk, customjson).
common.py holds the Task base class, TaskMixture / TaskSequence, render_mc and the data access
(Hugging Face hub download, or a local directory of gzip JSON lines: see its docstring).
"""
