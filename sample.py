"""
Chat with a model: `python sample.py --prompt "What is the capital of France?" --temperature 0`
prints the embedded SmolLM2-135M-Instruct's reply (greedy at temperature 0).
"""
import argparse
import sys
import time

import torch

from ivft import chat
from ivft.engine import add_device_flags, autocast, resolve_precision
from ivft.errors import LoadError
from ivft.load import load_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# I/O
parser.add_argument("--prompt", default="What is the capital of France?", help="the user message")
parser.add_argument("--system", default=None, help="system prompt (default: the model's own default, if any)")
parser.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
# model
parser.add_argument("--model", default=None, help=".gguf file or HF model directory (default: embedded SmolLM2-135M-Instruct)")
parser.add_argument("--chat_template", metavar="FILE", help=chat.FLAG_HELP)
add_device_flags(parser)      # --device, --dtype (autocast), --model_dtype (weights), as every script
# sampling
parser.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
parser.add_argument("--num_samples", type=int, default=1, help="replies to draw")
parser.add_argument("--seed", type=int, default=1337, help="random seed for sampling")
args = parser.parse_args()
for ok, msg in [(args.num_samples >= 1, f"--num_samples {args.num_samples}: must be >= 1"),
                (args.max_new_tokens >= 1, f"--max_new_tokens {args.max_new_tokens}: must be >= 1"),
                (args.temperature >= 0 and args.temperature != float("inf"),
                 f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)"),
                (args.top_k >= 0, f"--top_k {args.top_k}: must be >= 0 (0 = all tokens)")]:
    if not ok:
        parser.error(msg)      # one line and exit status 2, before the model loads

try:
    device, amp, weights = resolve_precision(args)
except ValueError as e:
    parser.error(str(e))           # one line and exit status 2, before the model loads
try:
    model, tok = load_model(args.model, dtype=weights, device=device, chat_template=args.chat_template)
except LoadError as e:
    sys.exit(f"error: {e}")
if tok is None:
    sys.exit(f"error: {args.model}: no tokenizer files (tokenizer.json or encoder.json + vocab.bpe) beside the weights")

templated = not args.raw and tok.chat_format is not None
ids = tok.chat_prompt(args.prompt, system=args.system) if templated else tok.encode(args.prompt)
# positions past the model's context are outside what it was trained on (RoPE: fluent-looking
# garbage, learned positions: an index error), so a prompt must leave room for at least one reply token
context = model.config.max_position_embeddings
if len(ids) >= context:
    print(f"error: --prompt is {len(ids)} tokens{' with the chat template' if templated else ''}, but the "
          f"model's context is {context} positions, one at least for the reply: shorten it by "
          f"{len(ids) - context + 1} tokens or more", file=sys.stderr)
    sys.exit(2)
max_new = min(args.max_new_tokens, context - len(ids))
if max_new < args.max_new_tokens:
    print(f"note: --max_new_tokens {args.max_new_tokens} lowered to {max_new}: the prompt takes {len(ids)} "
          f"of the model's {context} positions", file=sys.stderr)
idx = torch.tensor([ids] * args.num_samples, device=device)
gen = torch.Generator(device=device).manual_seed(args.seed)
t0 = time.time()
with autocast(amp, device.type):
    out = model.generate(idx, max_new, temperature=args.temperature, top_k=args.top_k or None,
                         stop_ids=tok.stop_ids(), generator=gen)
dt = time.time() - t0
stop = tok.stop_ids()
for row in out.tolist():
    row = row[: next((i for i, t in enumerate(row) if t in stop), len(row))]  # cut at the end of the turn
    print(tok.decode(row))
    print("-" * 40)
print(f"{out.numel()} tokens in {dt:.2f}s ({out.numel() / dt:.1f} tok/s)", file=sys.stderr)
