"""
SmolTalk, general chat data: hub dataset HuggingFaceTB/smol-smoltalk (the "smol" version, suited to
small models), splits train (~460K conversations) and test (~24K). Rows are {"messages": [...]},
sometimes led by a system message, which render_conversation folds into the first user turn.
No evaluation: it is training and validation-loss data.
"""
from nanochat_jax.tasks.common import Task, check_messages, load_rows

# hub repo layout: data/train-0000{0..3}-of-00004.parquet and data/test-00000-of-00001.parquet (the file
# listing of HuggingFaceTB/smol-smoltalk); datasets concatenates the train shards in this order
HUB_FILES = {
    "train": [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)],
    "test": ["data/test-00000-of-00001.parquet"],
}


class SmolTalk(Task):

    def __init__(self, split, tasks_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in HUB_FILES:
            raise ValueError(f"SmolTalk split must be train|test, got {split!r}")
        self.split = split
        self.rows = load_rows(f"SmolTalk {split}", f"smoltalk_{split}", "HuggingFaceTB/smol-smoltalk", HUB_FILES[split], tasks_dir)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        messages = self.rows[index]["messages"]
        check_messages(messages, f"SmolTalk {self.split} example {index}")  # per access: checking 460K rows up front takes minutes
        return {"messages": messages}
