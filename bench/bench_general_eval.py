"""
Time experiments/general_eval.py on a model: the per-stage subset (STAGE_N IF and everyday prompts,
every knowledge item) against the full set, part by part, and the ratio. Not a test: numbers depend
on the machine and its load.

    python bench/bench_general_eval.py --threads 2                          # the embedded model
    python bench/bench_general_eval.py --threads 2 --model runs/x/stage-4   # a tuned one (its replies differ)

The goal it checks (issue 38): a per-stage evaluation within ~3 min on 2 cores. The original's
replies to the everyday prompts are computed once per prompt set and cached (a temporary folder
here): that is printed apart; each evaluation reads them. Besides wall time
it prints CPU seconds / threads, which approximates an idle machine when others share the cores.
"""
import argparse
import copy
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from ivft.load import load_model

# experiments/general_eval.py is a script, not an installed module: loaded from its file
_spec = importlib.util.spec_from_file_location(
    "general_eval", Path(__file__).resolve().parents[1] / "experiments" / "general_eval.py")
G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(G)

GOAL_S = 180


def timed(what, model, tok, original, cache, n):
    t0, c0 = time.perf_counter(), time.process_time()
    r = G.general_eval(model, tok, original=original, n_if=n, n_drift=n, cache_dir=cache, n_boot=200)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    parts = ", ".join(f"{p} {s:.1f}" for p, s in r["seconds"].items())
    print(f"{what:28s} wall {wall:6.1f} s  CPU/threads {cpu / torch.get_num_threads():6.1f} s  ({parts})")
    return wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--model", default=None, help="the evaluated checkpoint (none = the embedded model)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--stage_n", type=int, default=G.STAGE_N, help="IF and everyday prompts per stage")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    original, tok = load_model(None)
    # no --model: a second copy of the original, so that drift runs its forward passes as for a tuned
    # model (the original itself scores 0 without one); its IF replies are the base's, the longest
    model = copy.deepcopy(original) if args.model is None else load_model(args.model)[0]
    print(f"{args.threads} threads, {args.stage_n} prompts per stage, model {args.model or 'embedded'}")
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        for n in (args.stage_n, None):      # the original's replies to both prompt sets, once
            G.general_eval(original, tok, parts=("drift",), n_drift=n, cache_dir=cache, n_boot=10)
        print(f"{'the original replies (once)':28s} wall {time.perf_counter() - t0:6.1f} s")
        stage = timed("per-stage subset", model, tok, original, cache, args.stage_n)
        full = timed("full set (after the last)", model, tok, original, cache, None)
    print(f"per-stage / full = {stage / full:.2f}; per-stage {stage:.0f} s against the goal of {GOAL_S} s: "
          f"{'met' if stage <= GOAL_S else 'NOT met'}")


if __name__ == "__main__":
    main()
