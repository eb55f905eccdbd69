"""
Re-injection done right: how much of the general suite's lost score does the original model's IV
bring back to a fine-tuned model, measured against what that IV does for the original model too?
The study's item (c) divided the final model's gain from the IV by the original model's loss
*without* the IV; the IV lifts the original model as well, so that share is overstated. Here the
reference is the original model with the same IV, and two controls show what any vector does: a
random Gaussian direction and another task's IV, at this IV's norm and layer. Every score is
evaluate.py's zero-shot greedy-reply score (primary metric), the vector at each prompt's last token.

    python experiments/reinject.py --final runs/study/A-plain-s0 --out results/reinject_A-plain-s0.json
    python experiments/reinject.py --final runs/study/B-guided-s0/stage-4 --out PATH.json --n 50 --threads 1

--final: a run folder (its newest checkpoint, ivft.checkpoint.newest_checkpoint) or one checkpoint.
Files: reads the checkpoint and the original model's IVs in ivs/<model>/ (made there with the study's
settings if missing, as study.py's analyses do); writes only --out (JSON, atomically).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import torch

import evaluate as E
import extract_iv as X
from ivft import tasks as T
from ivft.checkpoint import newest_checkpoint, read_state
from ivft.files import check_writable
from ivft.ivfile import config_hash, iv_filename, model_tag
from ivft.ivsettings import check_layer
from ivft.load import load_model
from ivft.report import mean, save_report
from ivft.runtime import TrainError, code_version
from model import Intervention
from common import IV_SETTINGS     # a sibling: the study's IV settings, so that its IV files serve here

ROOT = Path(__file__).resolve().parents[1]
SCORES = ("original", "original_iv", "final", "final_iv", "final_random", "final_other_iv")
# recovery key -> (the score with the vector, the reference whose gap to "final" it divides by)
RECOVERIES = {"recovery_vs_original": ("final_iv", "original"),        # the old, overstated share
              "recovery_vs_original_iv": ("final_iv", "original_iv"),  # the honest one
              "recovery_random": ("final_random", "original_iv"),
              "recovery_other_iv": ("final_other_iv", "original_iv")}


def iv_edit(layer: int, vector: torch.Tensor) -> Intervention:
    """The edit every score here uses: `vector` added to the residual stream after block `layer`
    (evaluate.py places it at each prompt's last token)."""
    return Intervention(add_resid={layer: vector})


def task_score(model, tok, task, n, add=None, *, batch_size=E.BATCH_SIZE, dtype="float32"):
    """-> (the task's primary zero-shot score on its first n test examples, examples scored), by
    evaluate.evaluate_suite itself; add = (layer, vector) or None."""
    edit = None if add is None else iv_edit(*add)
    rep = E.evaluate_suite(model, tok, [task], n=n, metrics=(E.canonical_metric(task.metric),),
                           batch_size=batch_size, dtype=dtype, progress=False, intervention=edit)
    return E.primary_score(rep, task.name), rep["tasks"][task.name]["n"]


def task_seed(seed: int, name: str) -> int:
    """A seed for one task's random vector, the same in every process (hash() of a str is not)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big") & (2**63 - 1)


def rescaled(direction: torch.Tensor, iv: torch.Tensor) -> torch.Tensor:
    """`direction` at the IV's norm, in the IV's dtype (a zero direction stays zero)."""
    d = direction.double()
    return (d * (iv.double().norm() / d.norm().clamp_min(1e-30))).to(iv.dtype)


def random_like(iv: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """A fixed-seed Gaussian direction, one per (seed, task), at the IV's norm."""
    g = torch.Generator().manual_seed(task_seed(seed, name))
    return rescaled(torch.randn(iv.shape, generator=g, dtype=torch.float64), iv)


def other_tasks(names: list[str], other: dict | None) -> dict:
    """{task: the task whose IV is its control}: `other`, else the next task in order (cyclic);
    None where there is no other task (a suite of one)."""
    out = {n: (names[(i + 1) % len(names)] if len(names) > 1 else None) for i, n in enumerate(names)}
    for n, o in (other or {}).items():
        if n not in out or o not in out or o == n:
            raise ValueError(f"other: {n!r} -> {o!r} must map a task to another task of {names}")
        out[n] = o
    return out


def share(row: dict, with_vector: str, reference: str, margin: float) -> float | None:
    """(with_vector - final) / (reference - final), None where the gap is not above `margin`."""
    gap = row[reference] - row["final"]
    if row[with_vector] is None or not gap > margin:
        return None
    return (row[with_vector] - row["final"]) / gap


def noise_margin(p: float, n: int) -> float:
    """2 binomial standard errors of a score p over n examples."""
    return 2 * math.sqrt(max(p * (1 - p), 0.0) / n)


def task_row(original, final, tok, task, iv, layer, other_iv, *, n, seed, margin, **kw) -> dict:
    """One task's scores, noise margins and recovered shares (reinjection's row)."""
    runs = {"original": (original, None), "original_iv": (original, iv), "final": (final, None),
            "final_iv": (final, iv), "final_random": (final, random_like(iv, seed, task.name)),
            "final_other_iv": (final, None if other_iv is None else rescaled(other_iv, iv))}
    row = {"n": None}
    for key, (model, vec) in runs.items():
        if key == "final_other_iv" and vec is None:     # no other task to take a direction from
            row[key] = None
            continue
        row[key], row["n"] = task_score(model, tok, task, n, None if vec is None else (layer, vec), **kw)
    row |= {"layer": layer, "iv_norm": float(iv.norm())}
    for ref in ("original", "original_iv"):
        m = noise_margin(row[ref], row["n"]) if margin is None else float(margin)
        # also True where the final model is better: then nothing was lost to recover
        row[f"margin_vs_{ref}"], row[f"within_noise_vs_{ref}"] = m, not row[ref] - row["final"] > m
    for key, (with_vector, ref) in RECOVERIES.items():
        row[key] = share(row, with_vector, ref, row[f"margin_vs_{ref}"])
    return row


def reinjection(original, final, tok, tasks, ivs, *, n, seed=0, batch_size=E.BATCH_SIZE, other=None,
                margin=None, dtype="float32") -> dict:
    """Scores of the original and the final model with and without each task's original IV, the two
    controls on the final model, and the recovered shares (module docstring). ivs: {task name: (iv
    (C,), layer)}. margin: the gap a share needs (None = 2 binomial standard errors of the reference
    score). -> {"tasks": {name: row}, "mean": {key: mean over the tasks where defined}, "settings"}."""
    if config_hash(original) != config_hash(final):
        raise ValueError("the original and the final model have different architectures")
    names = [t.name for t in tasks]
    if missing := [x for x in names if x not in ivs]:
        raise ValueError(f"no IV for task(s) {missing}")
    partner = other_tasks(names, other)
    vec = {x: ivs[x][0].detach().float().cpu() for x in names}
    rows = {}
    for task in tasks:
        layer = check_layer(int(ivs[task.name][1]), final.n_layers, f"task {task.name!r}: IV layer")
        if tuple(vec[task.name].shape) != (final.config.hidden_size,):
            raise ValueError(f"task {task.name!r}: IV of shape {tuple(vec[task.name].shape)}, the model "
                             f"needs ({final.config.hidden_size},)")
        o = partner[task.name]
        rows[task.name] = task_row(original, final, tok, task, vec[task.name], layer, vec.get(o), n=n,
                                   seed=seed, margin=margin, batch_size=batch_size, dtype=dtype)
        rows[task.name]["other_task"] = o
    means = {k: mean(r[k] for r in rows.values() if r[k] is not None) for k in (*SCORES, *RECOVERIES)}
    means["tasks_defined"] = {k: sum(r[k] is not None for r in rows.values()) for k in RECOVERIES}
    settings = {"n": n, "seed": seed, "dtype": str(dtype), "batch_size": batch_size,
                "margin": "2 binomial standard errors of the reference" if margin is None else margin}
    return {"tasks": rows, "mean": means, "settings": settings}


def final_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, or a run folder's newest checkpoint; ValueError naming the path."""
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise ValueError(f"--final {path}: no such file or directory")
    found = newest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise ValueError(f"--final {path}: not a checkpoint, nor a run folder holding one (stage-*/, last/)")
    if found.name == "last":
        print(f"note: {found} is a mid-task checkpoint: the run did not finish", file=sys.stderr)
    return found


def run_dtype(ckpt: Path) -> str:
    """The dtype the run's stage reports were evaluated in (greedy replies differ a little between
    bf16 and fp32, so the scores here match the run's), float32 when the checkpoint does not say."""
    try:
        return read_state(ckpt)["stages"][0]["settings"]["groups"][0]["dtype"]
    except (TrainError, KeyError, IndexError, TypeError):   # no train_state.pt, or not saying
        return "float32"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--final", required=True, help="the fine-tuned model: a run folder or a checkpoint")
    ap.add_argument("--out", required=True, help="JSON written here")
    ap.add_argument("--n", type=int, default=50, help="first n test examples per task")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random control vectors")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.threads < 0:
        ap.error("--n must be >= 1 and --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ckpt = final_checkpoint(Path(args.final))
        check_writable(Path(args.out).resolve().parent)     # fail now, not after an hour of scoring
        tasks = [T.load_task(name) for name in T.general_suite()]
        final, _ = load_model(str(ckpt))
        original, tok = load_model(None)
        tag = model_tag(None)
        ivs = {}
        for t in tasks:
            r = X.get_iv(original, tok, t, ROOT / "ivs" / tag / iv_filename(t), model_id=tag,
                         progress=False, **IV_SETTINGS)
            ivs[t.name] = (r["iv"], int(r["layer"]))
        res = reinjection(original, final, tok, tasks, ivs, n=args.n, seed=args.seed, dtype=run_dtype(ckpt))
    except (ValueError, KeyError, OSError, TrainError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"reinject.py: error: {msg}", file=sys.stderr)
        return 2
    res["settings"] |= {"final": str(ckpt), "model": tag, "iv_settings": IV_SETTINGS, "code": code_version()}
    save_report(res, args.out)
    heads = ("orig", "orig+IV", "final", "fin+IV", "fin+rnd", "fin+oth", "rec/o", "rec/o+IV", "rec/rnd",
             "rec/oth")
    print(f"{'task':16}" + "".join(f"{h:>9}" for h in heads))
    for name, r in [*res["tasks"].items(), ("mean", res["mean"])]:
        cells = ("        —" if r[k] is None else f"{r[k]:9.2f}" for k in (*SCORES, *RECOVERIES))
        print(f"{name:16}" + "".join(cells))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
