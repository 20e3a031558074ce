"""
Chat with a model in the terminal, streaming its replies.

python -m pipelines.chat_cli                          # the most-trained stage's latest run
python -m pipelines.chat_cli -i base -g d20 -s 2000   # a given checkpoint
python -m pipelines.chat_cli --checkpoint /tmp/d20-export -p "Why is the sky blue?"   # one shot

Type `clear` to start a new conversation, `quit` (or `exit`, or Ctrl-D) to leave.
"""
import argparse
import secrets
import sys

from nanochat_jax import xla_env
from nanochat_jax.engine import Engine
from nanochat_jax.checkpoint import STAGES
from nanochat_jax.export import load_model
from nanochat_jax.tokenizer import TextStream

parser = argparse.ArgumentParser(description="Chat with a model in the terminal")
parser.add_argument("--checkpoint", type=str, default=None, help="an export directory (python -m nanochat_jax.export)")
parser.add_argument("-i", "--source", type=str, default=None, choices=STAGES, help="training stage (default: the most-trained one that exists)")
parser.add_argument("-g", "--tag", type=str, default=None, help="training run (default: the most recent)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("-p", "--prompt", type=str, default=None, help="answer this one message and exit")
parser.add_argument("-t", "--temperature", type=float, default=0.6)
parser.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k filtering")
parser.add_argument("-m", "--max-tokens", type=int, default=256, help="per reply")
parser.add_argument("--seed", type=int, default=None, help="default: a different one every reply")
args = parser.parse_args()
xla_env.configure()  # XLA flags, GPU memory fraction, compilation cache: before JAX starts

model, tokenizer, description = load_model(args.checkpoint, args.source, args.tag, args.step)
engine = Engine(model, tokenizer)
special = tokenizer.encode_special
bos, user_start, user_end = special("<|bos|>"), special("<|user_start|>"), special("<|user_end|>")
assistant_start, assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
print(f"nanochat_jax: {description}. Type 'clear' for a new conversation, 'quit' to leave.", file=sys.stderr)


def reply(conversation, turn):
    """Stream the assistant's answer to stdout and extend the conversation with it."""
    prompt = conversation + [user_start, *tokenizer.encode(turn), user_end, assistant_start]
    room = engine.max_len - len(prompt)
    if room < 1:
        print(f"(that would make the conversation {len(prompt)} tokens; the model's context is {engine.max_len}. Type 'clear'.)")
        return
    conversation[:] = prompt
    text, seed = TextStream(tokenizer), secrets.randbits(31) if args.seed is None else args.seed
    for column, _ in engine.generate(list(conversation), max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                     top_k=args.top_k, seed=seed):
        token = column[0]
        conversation.append(token)  # tool calls and their forced outputs stay in the context
        if token in engine.stop_ids:
            break
        print(text.push(token), end="", flush=True)  # whole characters only: an emoji may span tokens
    print(text.flush())
    if conversation[-1] not in engine.stop_ids:
        conversation.append(assistant_end)  # cut off at max_tokens: close the turn anyway


conversation = [bos]
if args.prompt is not None:
    reply(conversation, args.prompt)
    sys.exit(0)
while True:
    try:
        turn = input("\nUser: ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        break
    if turn.lower() in ("quit", "exit"):
        break
    if turn.lower() == "clear":
        conversation = [bos]
        print("(new conversation)")
        continue
    if turn:
        print("\nAssistant: ", end="", flush=True)
        reply(conversation, turn)
