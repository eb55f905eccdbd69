"""
The instruction vectors of the embedded model under extract_iv.py's defaults, checked on held-out
test examples: for every general task, every default training task and the function-vector file
data/examples/category_fv.json, what `python extract_iv.py --task T --check --report ...` prints.

    python experiments/iv_check.py             # -> results/iv_check.json and a markdown table
    python experiments/iv_check.py --threads 2

IVs are cached where train.py looks for them (ivs/<model>/), so a later `train.py --guided` reuses them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import extract_iv as X
from ivft import tasks as T
from ivft.ivcheck import check_iv, check_report
from ivft.ivfile import iv_filename, model_tag
from ivft.ivprompts import load_task_by_name
from ivft.ivsettings import Settings
from ivft.load import load_model
from ivft.report import save_report

ROOT = Path(__file__).resolve().parents[1]

FV_FILE = ROOT / "data" / "examples" / "category_fv.json"


def table(res: dict) -> str:
    def f(v, fmt="{:.2f}"):
        return "—" if v is None else fmt.format(v).replace("-", "−")
    lines = ["| task | clean acc | query acc | +IV acc | gain | clean log P | query log P | +IV log P | restored log P | "
             "restored acc | chat log P → +IV | chat reply_contains → +IV |", "|" + "---|" * 12]
    for name, r in res["tasks"].items():
        chat = (f"{f(r.get('chat_logprob'))} → {f(r.get('chat_iv_logprob'))} | "
                f"{f(r.get('chat_contains'))} → {f(r.get('chat_iv_contains'))}")
        lines.append(f"| {name} | {f(r['clean_accuracy'])} | {f(r['corrupted_accuracy'])} | {f(r['iv_accuracy'])} | "
                     f"{f(r['accuracy_gain'], '{:+.2f}')} | {f(r['clean_logprob'])} | {f(r['corrupted_logprob'])} | "
                     f"{f(r['iv_logprob'])} | {f(r['restored_logprob'])} | {f(r['restored_accuracy'])} | {chat} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=None, help="comma-separated (default: general suite, default sequence, FV file)")
    ap.add_argument("--n_check", type=int, default=50, help="held-out test examples per task")
    ap.add_argument("--out", default=str(ROOT / "results" / "iv_check.json"), help="JSON written here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.tasks.split(",") if args.tasks else T.general_suite() + T.default_sequence() + [str(FV_FILE)]
    model, tok = load_model()
    model.eval()
    tag = model_tag(None)
    out = Path(args.out)
    res = {"settings": Settings().resolve(model).key(), "n_check": args.n_check, "tasks": {}}
    for name in names:
        task = load_task_by_name(name)
        t0 = time.perf_counter()
        r = X.get_iv(model, tok, task, ROOT / "ivs" / tag / iv_filename(task), model_id=tag, progress=False)
        chk = check_iv(model, tok, task, r["iv"], r["layer"], n=args.n_check, progress=False)
        rep = check_report(chk, r, task.name)
        rep["seconds"] = round(time.perf_counter() - t0, 1)
        rep["clean_top1_extraction"] = r["meta"].get("clean_top1_all")
        res["tasks"][task.name] = rep
        print(f"{task.name}: clean {rep['clean_accuracy']:.2f} query {rep['corrupted_accuracy']:.2f} "
              f"+IV {rep['iv_accuracy']:.2f}; restored logP {rep['restored_logprob']}, acc "
              f"{rep['restored_accuracy']} ({rep['seconds']} s)", flush=True)
        save_report(res, out)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
