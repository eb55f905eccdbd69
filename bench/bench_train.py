"""
Training-step benchmark, everything side by side in one run on the same batch:

1. step time of IV-guided training / plain training (goal: <= 1.5x), full fine-tuning and LoRA;
2. peak memory of plain / guided / LoRA training of the embedded model (CUDA: max allocated; CPU:
   peak RSS of a fresh subprocess per setting), and from it an estimate for a 7B model trained with
   LoRA on a bf16 base on one GPU;
3. training tokens/s of our loop vs transformers' LlamaForCausalLM driven by a plain PyTorch loop
   (forward with labels, backward, AdamW), same weights, same batch, same autocast.

    python bench/bench_train.py                   # embedded SmolLM2-135M, batch of 8 real training examples
    python bench/bench_train.py --steps 10 --batch 16 --device cuda

Timings are interleaved (one step of each setting per round, median over rounds) so that a busy
machine slows all settings alike. A step = forward, backward, gradient clipping, AdamW update.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import extract_iv
import train
from ivft import lora, tasks
from ivft.checkpoint import frozen_copy
from ivft.data import Item, collate, encode_example
from ivft.engine import resolve_amp
from ivft.ivsettings import default_layer
from ivft.load import default_gguf_path, gguf_cache_path, load_model
from ivft.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

# Llama-2-7B's shape (the paper's model): used for the memory estimate
LLAMA2_7B = {"params": 6.74e9, "layers": 32, "d_model": 4096, "vocab": 32000}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("workload")
    g.add_argument("--model", default=None, help="HF dir or .gguf; default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--task", default=None, help="task whose training examples form the batch (default: first of "
                   "the default sequence)")
    g.add_argument("--batch", type=int, default=8, help="examples per step")
    g.add_argument("--steps", type=int, default=6, help="timed rounds (one step of every setting per round)")
    g.add_argument("--lora_r", type=int, default=8, help="LoRA rank of the LoRA settings (q_proj, v_proj)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype; auto = bf16 where the hardware has native bf16 (as train.py)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    g.add_argument("--no_memory", action="store_true", help="skip the memory measurements")
    g.add_argument("--no_hf", action="store_true", help="skip the transformers comparison")
    g.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    g.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)   # internal: one memory run
    return p


# ---- the workload -------------------------------------------------------------------------------

def task_iv(model, tok, task: str, device) -> tuple[torch.Tensor, int]:
    """The task's IV and layer as train.py --guided gets them (extract_iv.extract_iv: exact mediation
    over every head, at the default layer), from fewer prompts (8 clean, 4 corrupted) than train.py's
    50 and 25: a step costs the same whatever the IV's values, which only need to be a real IV's."""
    r = extract_iv.extract_iv(model, tok, task, n_clean=8, n_corrupt=4, progress=False)
    return r["iv"].to(device), int(r["layer"])


def make_batch(tok, args, device):
    name = args.task or tasks.default_sequence()[0]
    task = tasks.load_task(name)
    items = [Item(*encode_example(tok, ex, 256), 0) for ex in task.train[:args.batch]]
    return collate(items, tok.pad_id, device), name


def setting(model, kind: str, layer: int, iv: torch.Tensor, lora_r: int, copy_model: bool = True):
    """A LossModule + optimizer for one setting: plain | guided | lora | lora-guided. Guided = the
    defaults of `train.py --guided`: α·IV in the trained model (α = 0.5, mid-task), KL at the last
    prompt token against the reference + IV (a frozen copy; with LoRA the adapters-off base)."""
    model = copy.deepcopy(model) if copy_model else model
    if kind.startswith("lora"):
        lora.add_lora(model, lora_r, 2 * lora_r, 0.1, ("q_proj", "v_proj"))
    lm = train.LossModule(model)
    if kind.endswith("guided"):
        g = lm.guidance
        g.ivs, g.layers = iv[None].to(iv.device), torch.tensor([layer], device=iv.device)
        g.train_iv, g.kl_iv, g.kl_weight, g.alpha, g.kl_temp = True, True, 1.0, 0.5, 2.0
        lm.reference = train.Reference(model, "original") if kind.startswith("lora") else \
            train.Reference(frozen_copy(model))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return lm, torch.optim.AdamW(params, lr=1e-5), params


def our_step(lm, opt, params, batch, amp):
    norms = (float((batch["targets"] != -100).sum()), float(len(batch["idx"])))
    with amp():
        loss, _ = lm(batch, norms)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def hf_model_dir(model_arg):
    """An HF directory holding the weights: --model itself, or the cache load.py converts the
    embedded GGUF into (filled by any earlier load_model call)."""
    if model_arg is not None and os.path.isdir(model_arg):
        return model_arg
    path = gguf_cache_path(default_gguf_path() if model_arg is None else Path(model_arg))
    if not (path / "config.json").is_file():
        load_model(model_arg)
    return str(path)


def hf_setup(model_dir, batch, device):
    """transformers' LlamaForCausalLM with the same weights, and the batch in its label convention."""
    from transformers import LlamaForCausalLM     # a test-only dependency: --no_hf runs without it
    hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device)
    hf.train()
    # HF shifts labels inside: labels[t] is predicted from position t-1, so ours (targets[t] = token
    # after idx[t]) move one to the right
    labels = torch.full_like(batch["targets"], -100)
    labels[:, 1:] = batch["targets"][:, :-1]
    mask = batch["pad_mask"] if batch["pad_mask"] is not None else torch.ones_like(batch["idx"], dtype=torch.bool)
    inputs = {"input_ids": batch["idx"], "attention_mask": mask.long(), "labels": labels}
    return hf, torch.optim.AdamW(hf.parameters(), lr=1e-5), inputs


def hf_step(hf, opt, inputs, amp):
    with amp():
        loss = hf(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- memory ------------------------------------------------------------------------------------------

def rss_mb(field: str = "VmHWM") -> float:
    """VmHWM = peak resident memory of this process, VmRSS = current. Read from /proc: getrusage's
    ru_maxrss survives execve on Linux, so a child started by a big parent would report the parent's
    peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024                       # kB -> MB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # elsewhere: best effort


@torch.no_grad()
def touch(model):
    # page in mmap-backed weights (safetensors loads lazily), so that "loaded" counts all of them
    for p in model.parameters():
        p.sum()


def memory_child(args):
    """One setting in a fresh process: RSS after loading vs peak RSS after 3 steps (CPU)."""
    device = torch.device(args.device)
    amp = amp_ctx(args, device)
    if args._memory_child == "hf":
        # transformers' model only: loaded straight from the HF directory, ours never built
        model_dir = hf_model_dir(args.model)
        batch, _ = make_batch(Tokenizer.from_hf_dir(model_dir), args, device)
        hf, opt, inputs = hf_setup(model_dir, batch, device)
        touch(hf)
        base = rss_mb("VmRSS")
        for _ in range(3):
            hf_step(hf, opt, inputs, amp)
        print(json.dumps({"loaded_mb": base, "peak_mb": rss_mb("VmHWM")}))
        return
    model, tok = load_model(args.model, device=device)
    batch, _ = make_batch(tok, args, device)
    layer = default_layer(model.n_layers)
    # a random IV here: extracting one would raise this process's peak memory (VmHWM), which is the
    # measurement; the step's memory does not depend on the IV's values
    iv = torch.randn(model.config.hidden_size, device=device)
    touch(model)
    base = rss_mb("VmRSS")
    lm, opt, params = setting(model, args._memory_child, layer, iv, args.lora_r, copy_model=False)
    for _ in range(3):
        our_step(lm, opt, params, batch, amp)
    print(json.dumps({"loaded_mb": base, "peak_mb": rss_mb("VmHWM")}))


def measure_memory(args, kinds):
    out = {}
    for kind in kinds:
        if args.device.startswith("cuda"):
            continue
        cmd = [sys.executable, __file__, "--_memory_child", kind, "--batch", str(args.batch), "--device", args.device,
               "--dtype", args.dtype, "--lora_r", str(args.lora_r)] + (["--model", args.model] if args.model else []) \
            + (["--task", args.task] if args.task else []) + (["--threads", str(args.threads)] if args.threads else [])
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        if r.returncode != 0:
            raise SystemExit(f"memory run {kind} failed:\n{r.stderr[-2000:]}")
        out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def estimate_7b_lora(act_bytes_per_token_layer_channel: float, tokens: int, lora_r: int) -> dict:
    """GPU memory of LoRA training of a Llama-2-7B-shaped model on a bf16 base, from our measured
    activation cost per (token x layer x d_model): frozen bf16 weights + fp32 adapters with grads and
    AdamW moments (16 B/param) + activations scaled by layers x d_model + answer-position logits."""
    m = LLAMA2_7B
    weights = m["params"] * 2
    lora_params = m["layers"] * 2 * (m["d_model"] * lora_r * 2)            # q_proj, v_proj: A and B
    adapters = lora_params * 16
    acts = act_bytes_per_token_layer_channel * tokens * m["layers"] * m["d_model"]
    gib = 1024 ** 3
    return {"weights_gib": weights / gib, "adapters_gib": adapters / gib, "activations_gib": acts / gib,
            "total_gib": (weights + adapters + acts) / gib}


# ---- main -----------------------------------------------------------------------------------------------

def amp_ctx(args, device):
    dtype = resolve_amp(args.dtype, device)
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_child:
        return memory_child(args)
    device = torch.device(args.device)
    mem = {}
    if not args.no_memory and device.type != "cuda":
        # before this process loads anything: the children then share the machine with a small parent
        mem = measure_memory(args, ["plain", "guided", "lora", "lora-guided"] + ([] if args.no_hf else ["hf"]))
    model, tok = load_model(args.model, device=device)
    batch, task = make_batch(tok, args, device)
    n_tok = int(batch["pad_mask"].sum()) if batch["pad_mask"] is not None else batch["idx"].numel()
    n_ans = int((batch["targets"] != -100).sum())
    t0 = time.perf_counter()
    iv, layer = task_iv(model, tok, task, device)
    print(f"IV of {task}: extracted in {time.perf_counter() - t0:.1f} s (layer {layer}, norm {iv.norm():.3g})")
    amp = amp_ctx(args, device)
    print(f"model {args.model or 'SmolLM2-135M-Instruct'} | batch {args.batch} x {batch['idx'].shape[1]} "
          f"({n_tok} tokens, {n_ans} answer tokens) from task {task} | {args.device} | "
          f"autocast {resolve_amp(args.dtype, device) or 'off (fp32)'} | "
          f"threads {torch.get_num_threads()}")

    # ---- 1 + 3: step times, interleaved -------------------------------------------------------------
    kinds = ["plain", "guided", "lora", "lora-guided"]
    runs = {k: (lambda s: (lambda: our_step(*s, batch, amp)))(setting(model, k, layer, iv, args.lora_r)) for k in kinds}
    if not args.no_hf:
        hf, hf_opt, inputs = hf_setup(hf_model_dir(args.model), batch, device)
        runs["hf"] = lambda: hf_step(hf, hf_opt, inputs, amp)
    times = {k: [] for k in runs}
    for k, f in runs.items():     # warm-up: allocator, autocast caches, lazy inits
        f()
    for _ in range(args.steps):
        for k, f in runs.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nstep time (median of {args.steps}; tokens/s = {n_tok} batch tokens / step time)")
    for k, t in med.items():
        label = {"hf": "transformers LlamaForCausalLM + plain loop"}.get(k, f"ours, {k}")
        print(f"  {label:45s} {t * 1000:9.1f} ms   {n_tok / t:8.0f} tok/s")
    res = {"batch_tokens": n_tok, "answer_tokens": n_ans, "step_s": med,
           "guided_over_plain": med["guided"] / med["plain"],
           "lora_guided_over_lora": med["lora-guided"] / med["lora"]}
    print(f"  ratio guided / plain (full fine-tuning):  {res['guided_over_plain']:.2f}x   (goal <= 1.5x)")
    print(f"  ratio guided / plain (LoRA r={args.lora_r}):        {res['lora_guided_over_lora']:.2f}x")
    if "hf" in med:
        res["ours_over_hf_tok_s"] = med["hf"] / med["plain"]
        print(f"  tokens/s ours (plain) / transformers:     {res['ours_over_hf_tok_s']:.2f}x")
    del runs
    if not args.no_hf:
        del hf, hf_opt

    # ---- 2: memory -----------------------------------------------------------------------------------
    if not args.no_memory:
        print("\npeak memory (fresh process per setting; RSS on CPU)")
        if device.type == "cuda":
            for k in ("plain", "guided", "lora", "lora-guided"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                s = setting(model, k, layer, iv, args.lora_r)
                for _ in range(3):
                    our_step(*s, batch, amp)
                mem[k] = {"peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20}
                del s
        for k, m in mem.items():
            extra = f"  (loaded: {m['loaded_mb']:.0f} MB, training adds {m['peak_mb'] - m['loaded_mb']:.0f} MB)" \
                if "loaded_mb" in m else ""
            print(f"  {k:12s} peak {m['peak_mb']:8.0f} MB{extra}")
        res["memory_mb"] = mem
        # activation cost per (token x layer x channel) from the LoRA run: what LoRA training adds to
        # the loaded weights is activations and their gradients (the adapters' state is ~MBs)
        if "lora" in mem and "loaded_mb" in mem["lora"]:
            C, L = model.config.hidden_size, model.n_layers
            act = (mem["lora"]["peak_mb"] - mem["lora"]["loaded_mb"]) * 2 ** 20
            per = max(act, 0) / (n_tok * L * C)
            res["act_bytes_per_token_layer_channel"] = per
            for tokens in (n_tok, 8 * 512):
                e = estimate_7b_lora(per, tokens, args.lora_r)
                res[f"llama7b_lora_bf16_{tokens}tok"] = e
                print(f"  estimate, Llama-2-7B LoRA r={args.lora_r} on a bf16 base, {tokens} tokens/step: "
                      f"{e['total_gib']:.1f} GiB (weights {e['weights_gib']:.1f}, adapters+Adam "
                      f"{e['adapters_gib']:.2f}, activations {e['activations_gib']:.1f}; "
                      f"{per:.1f} B per token x layer x channel measured here)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=float)
    return res


if __name__ == "__main__":
    main()
