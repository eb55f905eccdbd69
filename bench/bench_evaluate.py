"""
Time a full evaluation of the embedded model on the general suite (every metric, k-shot included)
and show where the time goes. Not a test: numbers depend on the machine and its load.

    python bench/bench_evaluate.py                              # fp32, all cores, 100 examples per task, k = 3
    python bench/bench_evaluate.py --dtype bfloat16 --compare   # bf16 autocast vs fp32: time and agreement
    python bench/bench_evaluate.py --per_metric                 # also each metric alone (its cost by itself)

The goal it checks: >= 6 tasks x ~100 examples, all metrics, in <= 120 s on a 2-core CPU. Besides
wall time it prints CPU seconds: on a machine shared with other jobs the wall time also counts the
time others held the cores, while CPU seconds / threads approximates an idle machine.

What was found on the project's 2-core AVX2 machine:
- All 9 metrics (0-shot and k-shot greedy replies of up to 32 tokens included), 530 examples,
  2 threads, idle machine: 109.5 s wall (41 s of it decoding), 4.8 GB peak RSS. 1 thread: 166 s.
  Before one reply served both generation metrics, decoding was pooled across tasks and batches
  were 128 prompts: 247 s (batches of 32) and 182 s (batches of 128).
- A decoding step costs ~100 ms + 3.5 ms per row: below ~30 rows the fixed part dominates, which
  is why rows of all tasks decode in one pool (ivft.engine.Decoder).
- 2 threads are far slower under load: OpenMP threads spin-wait for each other, ~15 ms per small
  matmul (OMP_WAIT_POLICY=PASSIVE removes the spinning; the two threads then cost ~20% extra CPU).
- bf16 autocast is ~4x slower than fp32 there (its matmuls ~8x: without AVX512-BF16/AMX they are
  emulated), and not exact: on 40 examples per task, 3 of 12 choice-accuracy cells moved by one
  example (log-probs by up to 0.11 nats). Use it on GPUs, and check agreement with --compare.
"""
import argparse
import json
import time

import torch

import evaluate as E
from ivft.load import load_model
from ivft.report import fmt_score, print_table, save_report


def run(model, tok, tasks, args, dtype, metrics=E.METRICS):
    timings = {}
    t0, c0 = time.perf_counter(), time.process_time()
    rep = E.evaluate_suite(model, tok, tasks, model_name="embedded", dtype=dtype, progress=not args.no_progress,
                           timings=timings, n=args.n or None, k_shot=args.k_shot, metrics=metrics,
                           batch_size=args.batch_size, seed=0)
    # CPU seconds / threads estimates the wall time on an idle machine: on a shared one the wall time
    # also counts the time other processes held the cores
    cpu = time.process_time() - c0
    print(f"[{dtype} {','.join(metrics) if len(metrics) == 1 else 'all metrics'}] wall {time.perf_counter() - t0:.1f} s, "
          f"CPU {cpu:.1f} s (/{torch.get_num_threads()} threads = {cpu / torch.get_num_threads():.1f} s)")
    return rep, timings, time.perf_counter() - t0


def print_phases(timings, total):
    # prefill serves all three chat metrics; "score" = choice ranking + gold log-prob; "generate" =
    # exact match's decoding; knowledge runs its own plain-text prompts
    print(f"{'phase':24s}{'seconds':>9s}{'share':>8s}")
    for k in sorted(timings):
        print(f"{k:24s}{timings[k]:9.1f}{100 * timings[k] / total:7.0f}%")
    print(f"{'(other: tokenize, ...)':24s}{total - sum(timings.values()):9.1f}")
    print(f"{'total':24s}{total:9.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--tasks", default=None, help="comma-separated task names (default: the general suite)")
    g.add_argument("--n", type=int, default=100, help="test examples per task (0 = all)")
    g.add_argument("--k_shot", type=int, default=3, help="demonstrations for the k-shot metrics")
    g = p.add_argument_group("system")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype of the main run")
    g.add_argument("--batch_size", type=int, default=E.BATCH_SIZE, help="prompts per forward pass")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default, all cores; "
                   "on a busy shared machine 1 can be faster: OpenMP threads spin-wait for each other)")
    g = p.add_argument_group("extra runs")
    g.add_argument("--compare", action="store_true", help="also run fp32 and report agreement with --dtype "
                   "(use with --dtype bfloat16)")
    g.add_argument("--per_metric", action="store_true", help="also time each metric on its own")
    g.add_argument("--out", default=None, help="write all numbers to this JSON file")
    g.add_argument("--no_progress", action="store_true", help="hide progress bars")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("config: " + json.dumps(vars(args)))

    t0 = time.perf_counter()
    model, tok = load_model(None)
    tasks = E.resolve_tasks(None if args.tasks is None else args.tasks.split(","))
    n_ex = sum(min(len(t.test), args.n or len(t.test)) for t in tasks)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; {len(tasks)} tasks, {n_ex} test examples, "
          f"{torch.get_num_threads()} threads")

    rep, timings, total = run(model, tok, tasks, args, args.dtype)
    print(f"\n== {args.dtype}: {total:.1f} s for {len(tasks)} tasks x {args.n or 'all'} examples, all metrics "
          f"({n_ex / total:.1f} examples/s; goal <= 120 s)")
    print_phases(timings, total)
    print_table(rep, E.METRICS)
    results = {"config": vars(args), "main": {"dtype": args.dtype, "seconds": total, "phases": timings, "report": rep}}

    if args.compare:
        ref, ref_t, ref_total = run(model, tok, tasks, args, "float32")
        print(f"\n== float32: {ref_total:.1f} s (x{ref_total / total:.2f} the {args.dtype} run)")
        print_phases(ref_t, ref_total)
        print(f"\n{'task':14s}{'metric':28s}{args.dtype:>10s}{'float32':>10s}{'diff':>9s}")
        agree = True
        for name, row in rep["tasks"].items():
            for m, v in row.items():
                w = ref["tasks"][name][m]
                print(f"{name:14s}{m:28s}{fmt_score(v):>10s}{fmt_score(w):>10s}{fmt_score(v - w) if m != 'n' else '':>9s}")
                agree &= not m.startswith("choice_accuracy") or v == w
        print(f"choice accuracy identical in every task: {agree}")
        results["float32"] = {"seconds": ref_total, "phases": ref_t, "report": ref, "choice_identical": agree}

    if args.per_metric:
        print("\n== each metric alone")
        results["per_metric"] = {}
        for m in E.METRICS:
            _, _, sec = run(model, tok, tasks, args, args.dtype, metrics=(m,))
            results["per_metric"][m] = sec
            print(f"{m:28s}{sec:7.1f} s")

    if args.out:
        save_report(results, args.out)
        print(f"numbers written to {args.out}")


if __name__ == "__main__":
    main()
