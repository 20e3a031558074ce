"""
MMLU, 57 subjects of four-choice questions: hub dataset cais/mmlu. Subset "all" has splits test
(14,042, the chat eval), validation, dev and auxiliary_train; nanochat v1 trains on subset
"auxiliary_train", split "train" (~100K questions from other MC datasets). Categorical, letters A-D.
"""
from nanochat_jax.tasks.common import Task, load_rows, render_mc

LETTERS = ("A", "B", "C", "D")
SPLITS = {"all": ("test", "validation", "dev", "auxiliary_train"), "auxiliary_train": ("train",)}


class MMLU(Task):
    eval_type = "categorical"
    letters = LETTERS

    def __init__(self, subset, split, tasks_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS.get(subset, ()):
            raise ValueError(f"MMLU (subset, split) must be one of {[(s, p) for s, ps in SPLITS.items() for p in ps]}, got ({subset!r}, {split!r})")
        self.subset, self.split = subset, split
        # hub repo layout: all/{test,validation,dev,auxiliary_train}-00000-of-00001.parquet with flat
        # columns, and auxiliary_train/train-00000-of-00001.parquet whose rows sit in one struct column
        # `train` (the file listing of cais/mmlu; nanochat v1 unwraps that column too)
        hub_file = "auxiliary_train/train-00000-of-00001.parquet" if subset == "auxiliary_train" else f"all/{split}-00000-of-00001.parquet"
        local_name = "mmlu_auxiliary_train" if "auxiliary_train" in (subset, split) else f"mmlu_{split}"
        self.rows = load_rows(f"MMLU {subset} {split}", local_name, "cais/mmlu", [hub_file], tasks_dir)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        row = row.get("train", row)  # unwrap the auxiliary_train struct column
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU {self.subset} {self.split} row {index}: expected 4 choices, got {len(row['choices'])}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
                {"role": "assistant", "content": LETTERS[row["answer"]]},
            ],
            "subject": row.get("subject", ""),  # for per-subject breakdowns (empty in auxiliary_train)
            "letters": LETTERS,
        }

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]
