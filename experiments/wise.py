"""
WiSE-FT post hoc (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the fine-tuned model's
weights mixed with the original's, θ = (1 - α)·θ_original + α·θ_tuned, then scored on the training tasks
and by the general evaluation (experiments/general_eval.py; drift from the original). No training: one
fine-tuned model gives a whole curve over α.

    python experiments/wise.py --tuned runs/x/stage-1 --alpha 0.5 --tasks uppercase --n 50 --out /tmp/w.json

Files: reads the two models and the tasks; writes --out (JSON, atomically).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import evaluate as E
import general_eval as GE  # a sibling: on the script's path
from ivft.data import load_task_list
from ivft.files import check_writable, write_json_atomic
from ivft.load import load_model
from ivft.runtime import code_version


@torch.no_grad()
def mix_into(tuned, original, alpha: float):
    """tuned's parameters and buffers <- (1 - alpha)·original's + alpha·tuned's, in place. A tensor
    state_dict() names twice (tied embeddings and lm_head) is mixed once."""
    theirs, done = original.state_dict(), set()
    for name, t in tuned.state_dict().items():
        if t.is_floating_point() and t.data_ptr() not in done:
            done.add(t.data_ptr())
            t.mul_(alpha).add_(theirs[name].to(t.dtype), alpha=1 - alpha)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--tuned", required=True, help="the fine-tuned checkpoint (an HF folder)")
    p.add_argument("--original", default=None, help="the original checkpoint (none = the embedded model)")
    p.add_argument("--alpha", type=float, required=True, help="weight of the tuned model, 0..1")
    p.add_argument("--tasks", required=True, help="training tasks to score (names or task files)")
    p.add_argument("--n", type=int, default=50, help="test items per training task (the first n)")
    p.add_argument("--split", default="test", choices=list(GE.SPLITS), help="the general evaluation's split")
    p.add_argument("--n_knowledge", type=int, default=0, help="first n items per general task (0 = all)")
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if not 0 <= args.alpha <= 1:
        print(f"wise.py: error: --alpha {args.alpha}: must be in [0, 1]", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_writable(Path(args.out).resolve().parent)
        tasks = load_task_list(args.tasks, "default_sequence", "training")
        original, tok = load_model(args.original)
        model = load_model(args.tuned)[0]
        mix_into(model, original, args.alpha)
        scores = {t.name: E.evaluate_task(model, tok, t, n=args.n, k_shot=0, progress=False)[E.canonical_metric(t.metric)]
                  for t in tasks}
        general = GE.general_eval(model, tok, original=original, split=args.split,
                                  n_knowledge=args.n_knowledge or None)
    except (ValueError, OSError) as e:
        print(f"wise.py: error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, {"tuned": args.tuned, "alpha": args.alpha, "tasks": scores, "n": args.n,
                                 "general": {**general, "settings": {"split": args.split,
                                                                     "n_knowledge": args.n_knowledge}},
                                 "code": code_version()})
    print(f"wise.py: alpha {args.alpha}: {scores}; report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
