"""
ARC (AI2 Reasoning Challenge), grade-school science multiple choice: hub dataset allenai/ai2_arc,
subsets ARC-Easy / ARC-Challenge, splits train / validation / test. Categorical: the answer is one
of the question's own labels (usually A-D; a few hub rows use 1-4, and some have 3 or 5 choices).
"""
from nanochat_jax.tasks.common import Task, load_rows, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset, split, tasks_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS or split not in SPLITS:
            raise ValueError(f"ARC subset must be one of {SUBSETS} and split one of {SPLITS}, got {subset!r}, {split!r}")
        self.subset, self.split = subset, split
        local_name = f"{subset.lower().replace('-', '_')}_{split}"  # arc_easy_test, arc_challenge_train, ...
        # one parquet file per config/split in the hub repo, e.g. ARC-Easy/test-00000-of-00001.parquet
        # (the repo's file listing; the same paths appear in the hub's pandas snippets for this dataset)
        self.rows = load_rows(f"ARC {subset} {split}", local_name, "allenai/ai2_arc",
                              [f"{subset}/{split}-00000-of-00001.parquet"], tasks_dir)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        letters = list(row["choices"]["label"])
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC {self.subset} {self.split} row {row.get('id')}: answer {row['answerKey']!r} is not one of {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                {"role": "assistant", "content": row["answerKey"]},
            ],
            "letters": letters,  # the evaluator restricts its argmax to these tokens
        }

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]
