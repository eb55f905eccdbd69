"""
Benchmark of the three ways extract_iv.py computes the AIE of every head, on the embedded model:

- naive:       Todd et al.'s loop, one full forward per (layer, head) per corrupted prompt;
- exact:       the corrupted prompt once with its KV cache, then only the last position from the
               patched layer upward, all heads as rows of one batch (same numbers as naive);
- attribution: one forward + one backward per prompt, gradient x (z̄ - z) (a first-order estimate).

    python bench/bench_extract.py                       # antonym, all 270 heads, 25 corrupted prompts
    python bench/bench_extract.py --naive_prompts 2     # measure the naive loop on 2 prompts
    python bench/bench_extract.py --corrupt shuffled    # long corrupted prompts (10 shuffled demonstrations)

Prompts are extract_iv.py's defaults: 10-shot clean prompts, the query alone as the corrupted one.

The naive loop costs minutes per prompt on a CPU, so it runs on --naive_prompts prompts (default 1)
and its time is scaled to all prompts (the output says so); on those prompts the exact method's
values are also compared with it. Goals: exact >= 100x faster than naive and equal to it to 1e-5;
Spearman correlation of attribution with exact reported (>= 0.8 is the goal).
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

import extract_iv as X
from ivft.ivcheck import spearman
from ivft.ivprompts import clean_prompts, corrupted_prompts, load_task_by_name, score_prompts, split_train
from ivft.ivsettings import CORRUPTIONS, EFFECTS, Settings, default_top_k


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="naive vs fast exact vs attribution AIE on the embedded model")
    ap.add_argument("--task", default="antonym", help="task whose prompts are patched")
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--n_clean", type=int, default=50, help="clean prompts for the mean head outputs")
    ap.add_argument("--n_corrupt", type=int, default=25, help="corrupted prompts for exact and attribution")
    ap.add_argument("--naive_prompts", type=int, default=1, help="corrupted prompts the naive loop runs on")
    ap.add_argument("--effect", default="auto", choices=EFFECTS, help="metric patched (auto: extract_iv's rule)")
    ap.add_argument("--corrupt", default="query_only", choices=CORRUPTIONS, help="corrupted prompts")
    ap.add_argument("--seed", type=int, default=0, help="example selection seed")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return ap.parse_args(argv)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    from ivft.load import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task_by_name(args.task)
    model, tok = load_model(args.model)
    model.eval()
    L, H = model.n_layers, model.config.num_attention_heads
    s = Settings(n_clean=args.n_clean, n_corrupt=args.n_corrupt, seed=args.seed, effect=args.effect,
                 corrupt=args.corrupt)
    rng = random.Random(args.seed)
    pool, _ = split_train(task, s)
    examples = list(pool)
    rng.shuffle(examples)
    clean = clean_prompts(tok, task, examples[:args.n_clean], s, rng, pool=pool)
    corrupt = corrupted_prompts(tok, task, examples[-args.n_corrupt:], s, rng, pool=pool)
    sc = score_prompts(model, clean, record_z=True, desc="clean prompts")
    z_mean = sc["z"].mean(0)
    args.effect = X.choose_effect(args.effect, float(sc["p_first"].mean()),
                                  float(score_prompts(model, corrupt)["p_first"].mean()))
    mean_len = sum(len(p.ids) for p in corrupt) / len(corrupt)
    print(f"model: {L} layers x {H} heads = {L * H} heads; task {args.task}; {len(corrupt)} corrupted "
          f"prompts of {mean_len:.0f} tokens on average; effect {args.effect}; "
          f"{torch.get_num_threads()} threads")

    exact, t_exact = timed(lambda: X.aie_exact(model, corrupt, z_mean, effect=args.effect))
    attr, t_attr = timed(lambda: X.aie_attribution(model, corrupt, z_mean, effect=args.effect))
    k = args.naive_prompts
    naive, t_naive_k = timed(lambda: X.aie_naive(model, corrupt[:k], z_mean, effect=args.effect))
    # the same k prompts through the exact path, for the equality check (a few seconds)
    exact_k = X.aie_exact(model, corrupt[:k], z_mean, effect=args.effect, progress=False)
    t_naive = t_naive_k / k * len(corrupt)

    rho = spearman(attr, exact)
    top = default_top_k(L * H)
    overlap = len(set(X.top_heads(exact, top)) & set(X.top_heads(attr, top)))
    overlap10 = len(set(X.top_heads(exact, 10)) & set(X.top_heads(attr, 10)))
    diff = (exact_k - naive).abs().max().item()
    n = len(corrupt)
    print(f"{'method':<12} {'seconds':>9} {'s/prompt':>9} {'speedup':>8}")
    print(f"{'naive':<12} {t_naive:9.1f} {t_naive / n:9.2f} {1:8.1f}   "
          f"(measured on {k} prompt{'s' if k > 1 else ''}: {t_naive_k:.1f} s, scaled to {n})")
    print(f"{'exact':<12} {t_exact:9.1f} {t_exact / n:9.2f} {t_naive / t_exact:8.1f}")
    print(f"{'attribution':<12} {t_attr:9.1f} {t_attr / n:9.2f} {t_naive / t_attr:8.1f}")
    print(f"exact vs naive on the same {k} prompt(s): max |diff| = {diff:.2e}")
    print(f"attribution vs exact: Spearman {rho:.3f}; top-{top} overlap {overlap}/{top}; "
          f"top-10 overlap {overlap10}/10")
    print("top heads exact:      ", [(l, h, round(float(exact[l, h]), 4)) for l, h in X.top_heads(exact, 5)])
    print("top heads attribution:", [(l, h, round(float(attr[l, h]), 4)) for l, h in X.top_heads(attr, 5)])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": args.task, "n_corrupt": n, "naive_prompts": k, "t_naive_scaled": t_naive,
                       "t_naive_measured": t_naive_k, "t_exact": t_exact, "t_attribution": t_attr,
                       "speedup_exact": t_naive / t_exact, "speedup_attribution": t_naive / t_attr,
                       "spearman": rho, "max_diff_exact_naive": diff, "threads": torch.get_num_threads()},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
