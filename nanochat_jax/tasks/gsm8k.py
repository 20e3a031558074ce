"""
GSM8K, grade-school math word problems: hub dataset openai/gsm8k, subsets main / socratic, splits
train (7,473) / test (1,319). Generative. The reference solutions mark each calculation as
<<expr=result>>, e.g. "12/60 = $<<12/60=0.2>>0.2 per minute", and end with "#### <answer>"; we turn
each mark into a python tool call (trained) and its output (filled in by the tool, not trained).
"""
import re

from nanochat_jax.tasks.common import Task, load_rows

ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
CALC_RE = re.compile(r"<<([^>]+)>>")


def extract_answer(text):
    """The number after '####' with thousands commas removed (openai/grade-school-math's normalization), or None."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def solution_parts(answer):
    """GSM8K solution text -> assistant parts: text up to each <<expr=result>>, then python(expr) and
    python_output(result), and so on; the last text part holds '#### <answer>'."""
    parts, pos = [], 0
    for match in CALC_RE.finditer(answer):
        if match.start() > pos:
            parts.append({"type": "text", "text": answer[pos:match.start()]})
        expr, _, result = match.group(1).rpartition("=")
        if not _:  # a mark without '=': the whole thing is the expression
            expr, result = result, ""
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = match.end()
    parts.append({"type": "text", "text": answer[pos:]})
    return parts


def assistant_text(conversation):
    """All text of the final assistant message (parts joined), where the reference answer lives."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset, split, tasks_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(f"GSM8K subset must be main|socratic and split train|test, got {subset!r}, {split!r}")
        self.subset, self.split = subset, split
        local_name = f"gsm8k_{split}" if subset == "main" else f"gsm8k_socratic_{split}"
        # hub repo layout: {main,socratic}/{train,test}-00000-of-00001.parquet (the file listing of openai/gsm8k)
        self.rows = load_rows(f"GSM8K {subset} {split}", local_name, "openai/gsm8k",
                              [f"{subset}/{split}-00000-of-00001.parquet"], tasks_dir)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_parts(row["answer"])},
        ]}

    def evaluate(self, conversation, completion):
        """Exact match of the '####' numbers of the completion and the reference."""
        predicted = extract_answer(completion)
        return predicted is not None and predicted == extract_answer(assistant_text(conversation))

    def reward(self, conversation, completion):
        """RL reward: 1.0 if correct else 0.0."""
        return float(self.evaluate(conversation, completion))
