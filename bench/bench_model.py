"""
Forward and forward+backward throughput of our Transformer vs transformers' LlamaForCausalLM with the
same weights (the embedded SmolLM2-135M), dtype and batch, measured alternately in one run so that
machine noise hits both alike. Prints tokens/s and the ratio ours / HF (goal: >= 1.0).

    python bench/bench_model.py                 # fp32 and bf16 autocast, batch 8 x 128
"""
import argparse
import statistics
import time

import torch

from ivft.load import load_model, save_hf

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
parser.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds per mode")
parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list: float32 and/or bfloat16 (autocast)")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

from transformers import AutoModelForCausalLM  # noqa: E402  (benchmark-only dependency)

ours, tok = load_model(None)
# the HF model gets exactly our weights: export ours and let transformers load the directory
import tempfile  # noqa: E402
tmp = tempfile.mkdtemp()
save_hf(ours, tok, tmp)
hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
for m in (ours, hf):
    m.train()  # dropout is 0 in both; train mode so the backward timing is a real training step
idx = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))


def run(model, is_hf, backward, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        if backward:
            out = model(idx).logits if is_hf else model(idx)
            out.float().logsumexp(-1).mean().backward()  # a loss touching every logit, like CE
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(idx)


print(f"batch {args.batch}x{args.seq}, {torch.get_num_threads()} threads, torch {torch.__version__}")
print(f"{'mode':<22}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}")
for dtype in args.dtypes.split(","):
    for backward in (False, True):
        for m, is_hf in ((ours, False), (hf, True)):
            run(m, is_hf, backward, dtype)  # warm-up: allocator, autocast caches
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for m, is_hf in ((ours, False), (hf, True)):
                t0 = time.perf_counter()
                run(m, is_hf, backward, dtype)
                times[is_hf].append(time.perf_counter() - t0)
        ntok = args.batch * args.seq
        o, h = ntok / statistics.median(times[False]), ntok / statistics.median(times[True])
        name = f"{dtype} {'fwd+bwd' if backward else 'forward'}"
        print(f"{name:<22}{o:>12.0f}{h:>12.0f}{o / h:>7.2f}x")
