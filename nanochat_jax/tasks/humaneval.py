"""
HumanEval, 164 Python function-writing problems: hub dataset openai/openai_humaneval (split test).
Generative: the model writes the function; it passes if the problem's unit tests run clean on it in
the sandbox (evals.sandbox). program() builds the script alone, so a batch evaluator can run many
of them at once with evals.sandbox.run_programs.
"""
import re

from nanochat_jax.tasks.common import Task, load_rows

FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
IMPORT_RE = re.compile(r"^(?:import \w|from [\w.]+ import )")  # unindented import statements only


def extract_imports(prompt):
    """The prompt's import lines: the completion may restate the function without them."""
    return "\n".join(line for line in prompt.splitlines() if IMPORT_RE.match(line))


def extract_code(completion):
    """The first ``` (or ```python) fenced block of a completion, else the whole completion."""
    match = FENCE_RE.search(completion)
    return (match.group(1) if match else completion).strip()


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, tasks_dir=None, timeout=5.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout  # seconds per program; the tests are tiny, so this only stops runaway loops
        # hub repo layout: one config "openai_humaneval", file openai_humaneval/test-00000-of-00001.parquet
        # (the file listing of openai/openai_humaneval; nanochat HEAD names the same config)
        self.rows = load_rows("HumanEval", "humaneval", "openai/openai_humaneval",
                              ["openai_humaneval/test-00000-of-00001.parquet"], tasks_dir)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},  # signature + docstring
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},  # the whole function, as nanochat
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],  # the function check() is called on
            "test": row["test"],  # defines check(candidate)
        }

    @staticmethod
    def program(conversation, completion):
        """The script that passes iff the completion is right: prompt imports, the code, the tests, check(f)."""
        imports = extract_imports(conversation["messages"][0]["content"])
        return f"{imports}\n\n{extract_code(completion)}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"

    def evaluate(self, conversation, completion):
        from evals.sandbox import run_program  # imported here: building the task needs no sandbox
        return bool(run_program(self.program(conversation, completion), timeout=self.timeout).passed)
