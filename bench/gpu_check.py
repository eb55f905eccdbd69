"""
The GPU check: one prepared run that tells whether the project works on one GPU at real sizes, in
under 8 minutes on one H100, and writes one JSON file.

    python -m bench.gpu_check --out results/gpu_check.json --commit <sha>   # on a GPU machine
    python -m bench.gpu_check --smoke --out /tmp/gpu_check.json            # anywhere: tiny shapes

(-m from the repository root: this checkout's modules, installed or not; `python bench/gpu_check.py`
needs `pip install -e .` or PYTHONPATH=.)

Nothing is downloaded and nothing big travels: every model is random weights of a real shape built
on the device, and the model directory train.py runs on is written here, with a byte-level
tokenizer with ChatML turns built from scratch. Each part is timed, has a time budget, and runs in
its own try/except (a failure is recorded in the JSON and the next part runs):
  a. parity: logits of a small random model, CPU fp32 vs the device in fp32 and in bf16 autocast;
  b. train.py --guided --quick end to end on the device on a tiny model directory with the project's
     tasks (IV extraction, training, stage evaluation, the exported stage directories): exit status
     and wall time;
  c. forward + backward tokens/s and MFU of a ~1B Llama shape (TinyLlama-1.1B's) with bf16 weights,
     our model and transformers' LlamaForCausalLM side by side on the same batch and weights;
  d. a Llama-2-7B-shaped model with bf16 weights and LoRA (--regime lora's: r 8 on q_proj, v_proj,
     dropout 0.1, fp32 adapters): the guided step of train.py --guided --regime lora --model_dtype bf16
     (α·IV in the trained model, KL at the last prompt token to the adapters-off reference + IV, AdamW
     on the adapters), its peak memory and time, beside the memory plan's prediction (ivft.memplan,
     where it exists);
  e. exact mediation (extract_iv.aie_exact) on the 7B shape: seconds per corrupted prompt, and that
     extrapolated to every head (32 x 32 = 1,024) x 25 prompts (extract_iv.py's defaults).
Without CUDA (or with --smoke) every part runs with tiny shapes on the CPU; tests/test_gpu_check.py
runs that mode, so the script cannot rot between GPU runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

import extract_iv
import train
from ivft import lora, memplan
from ivft.engine import resolve_device
from ivft.ivprompts import Prompt
from ivft.load import config_to_hf, save_hf
from ivft.runtime import code_version
from ivft.tokenizer import GPT2_PATTERN, Tokenizer
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]

# Model shapes. "7b" is Llama-2-7B's (the paper's model), "1b" TinyLlama-1.1B's.
SHAPES = {
    "gpu": {"parity": dict(hidden=512, layers=4, heads=8, kv=4, inter=1376, vocab=32000, batch=2, seq=128),
            "1b": dict(hidden=2048, layers=22, heads=32, kv=4, inter=5632, vocab=32000, batch=4, seq=2048),
            "7b": dict(hidden=4096, layers=32, heads=32, kv=32, inter=11008, vocab=32000, batch=8, seq=256),
            "mediation": dict(prompts=3, prompt_len=64, heads=1024)},
    "smoke": {"parity": dict(hidden=32, layers=2, heads=4, kv=2, inter=64, vocab=300, batch=2, seq=16),
              "1b": dict(hidden=32, layers=2, heads=4, kv=2, inter=64, vocab=300, batch=2, seq=32),
              "7b": dict(hidden=64, layers=2, heads=4, kv=4, inter=172, vocab=320, batch=2, seq=32),
              "mediation": dict(prompts=2, prompt_len=16, heads=8)},
}
# seconds each part may take (a loop stops early past it; train.py's subprocess is killed past 2x)
BUDGET = {"gpu": {"parity": 30, "train_guided": 150, "throughput_1b": 80, "mediation_7b": 70, "lora_7b": 90},
          "smoke": {"parity": 10, "train_guided": 120, "throughput_1b": 10, "mediation_7b": 10, "lora_7b": 10}}
# --regime lora's adapters (ivft/config.py REGIME_PRESETS)
PROMPTS_PER_IV, LORA_R, LORA_TARGETS, LORA_DROPOUT = 25, 8, ("q_proj", "v_proj"), 0.1


# ---- helpers --------------------------------------------------------------------------------------

def model_config(s: dict, max_pos: int = 4096) -> ModelConfig:
    return ModelConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv"], max_position_embeddings=max_pos, rope_theta=10000.0)


def build(cfg: ModelConfig, dtype, device, seed=0) -> Transformer:
    """Random weights of this shape straight on the device in `dtype`: built on the meta device (no
    memory), then allocated once where it will run (a 7B model never passes through the CPU)."""
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    return m.init_weights(std=0.02)                     # also recomputes the fp32 RoPE table


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, budget_s: float, warmup: int = 1, at_most: int = 5) -> list[float]:
    """Seconds of each call of fn after `warmup` calls; stops at `at_most` calls or past the budget."""
    t_end = time.perf_counter() + budget_s
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < at_most and (not times or time.perf_counter() < t_end):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_bf16_flops(name: str) -> float | None:
    """Dense bf16 peak of known cards (vendor data sheets), for MFU; None for other devices."""
    n = name.lower()
    if "h100" in n:
        return 756e12 if "pcie" in n else 989e12
    if "h200" in n or "gh200" in n:
        return 989e12
    if "a100" in n:
        return 312e12
    return None


def random_batch(vocab: int, B: int, T: int, n_answer: int, device, seed=0) -> dict:
    """A training micro-batch as ivft.data.collate makes it: the last n_answer positions are the
    answer, the IV and the KL act at the token before them."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(3, vocab, (B, T + 1), generator=g)
    targets = torch.full((B, T), -100, dtype=torch.long)
    targets[:, T - n_answer:] = idx[:, T + 1 - n_answer:]
    return {"idx": idx[:, :T].to(device), "targets": targets.to(device), "pad_mask": None,
            "last": torch.full((B,), T - n_answer - 1, device=device), "task": torch.zeros(B, dtype=torch.long,
                                                                                        device=device),
            "n_tokens": B * T}


# ---- a. parity ---------------------------------------------------------------------------------------

def part_parity(sh, device, budget) -> dict:
    cfg = model_config(sh["parity"])
    cpu = build(cfg, torch.float32, torch.device("cpu")).eval()
    idx = torch.randint(0, cfg.vocab_size, (sh["parity"]["batch"], sh["parity"]["seq"]),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cpu(idx)                                                     # (B, T, V) fp32 on the CPU
        dev = build(cfg, torch.float32, device).eval()
        dev.load_state_dict(cpu.state_dict())
        out = {"shape": sh["parity"], "max_abs_logit": float(ref.abs().max())}
        out["fp32_max_abs_diff"] = float((dev(idx.to(device)).float().cpu() - ref).abs().max())
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf = dev(idx.to(device)).float().cpu()
        out["bf16_autocast_max_abs_diff"] = float((bf - ref).abs().max())
        out["bf16_autocast_top1_agreement"] = float((bf.argmax(-1) == ref.argmax(-1)).float().mean())
    return out


# ---- b. train.py --guided end to end -------------------------------------------------------------------

def byte_tokenizer():
    """256 byte tokens + ChatML's three control tokens (the chat format of SmolLM2): a tokenizer that
    needs no files, so the tiny model directory is self-made."""
    ranks = {bytes([b]): b for b in range(256)}
    special = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    return Tokenizer(ranks, special, GPT2_PATTERN, merges=[], bos_id=257, eos_id=258, pad_id=258)


def part_train_guided(mode, device, budget, work: Path, threads: int) -> dict:
    cfg = ModelConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    save_hf(build(cfg, torch.float32, torch.device("cpu")), byte_tokenizer(), work / "tiny")
    out_dir = work / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(work / "tiny"), "--guided", "--quick",
           "--out_dir", str(out_dir), "--iv_dir", str(work / "ivs"), "--max_steps", "3", "--eval_n", "3",
           "--device", str(device), "--dtype", "auto" if mode == "gpu" else "fp32"]
    cmd += ["--num_threads", str(threads)] if threads else []
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=2 * budget)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the CPU seconds too: on a busy machine the wall time says more about the neighbours than the run
    res = {"command": " ".join(cmd[1:]).replace(str(work), "<tmp>"), "exit_status": r.returncode,
           "wall_s": round(time.perf_counter() - t0, 1),
           "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1)}
    stages = sorted(p.parent.name for p in out_dir.glob("stage-*/model.safetensors"))
    res["exported_stages"] = stages
    res["exported_config_json"] = all((out_dir / s / "config.json").is_file() for s in stages)
    if (out_dir / "results.json").is_file():
        results = json.loads((out_dir / "results.json").read_text())
        res["metrics"] = results.get("metrics")
        res["n_stage_reports"] = len(results.get("stages", []))
    if r.returncode != 0:
        res["stderr_tail"] = r.stderr[-3000:]
        raise RuntimeError(f"train.py exited with {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", res)
    return res


# ---- c. ~1B throughput, ours vs transformers ----------------------------------------------------------

def flops_per_token(cfg: ModelConfig, n_matmul_params: int, T: int) -> float:
    # forward + backward = 3 x the forward's 2 FLOPs per weight, plus attention's QK^T and AV
    # (PaLM's convention, causal masking not discounted)
    return 6 * n_matmul_params + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T


def hf_llama(cfg: ModelConfig, device):
    """transformers' LlamaForCausalLM of the same shape, bf16, built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM     # a test-only dependency: imported where used
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                     rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
                     attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(hc)
    finally:
        torch.set_default_dtype(old)


def part_throughput(sh, device, budget, device_name) -> dict:
    s = sh["1b"]
    cfg = model_config(s, max_pos=max(4096, s["seq"]))
    ours = build(cfg, torch.bfloat16, device).train()
    hf = hf_llama(cfg, device).train()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)     # the same weights
    B, T = s["batch"], s["seq"]
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(2)).to(device)
    x, y = idx[:, :-1], idx[:, 1:]

    def ours_step():
        _, loss = ours(x, y)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def hf_step():
        # HF shifts the labels itself: labels = the inputs
        hf(input_ids=x, labels=x).loss.backward()
        hf.zero_grad(set_to_none=True)

    with torch.no_grad():
        loss_ours = float(ours(x, y)[1])
        loss_hf = float(hf(input_ids=idx, labels=idx).loss)   # same positions: HF drops the last input
    n_matmul = sum(p.numel() for n, p in ours.named_parameters() if "embed_tokens" not in n and p.dim() == 2)
    fpt = flops_per_token(cfg, n_matmul, T)
    peak = peak_bf16_flops(device_name)
    res = {"shape": s, "params": sum(p.numel() for p in ours.parameters()), "tokens_per_step": B * T,
           "flops_per_token": fpt, "peak_bf16_flops": peak, "hf_missing_keys": list(missing),
           "hf_unexpected_keys": list(unexpected), "loss_ours": loss_ours, "loss_transformers": loss_hf}
    for name, step in (("ours", ours_step), ("transformers", hf_step)):
        t = statistics.median(timed(step, device, budget / 2, warmup=2, at_most=5))
        res[name] = {"step_s": t, "tokens_per_s": B * T / t,
                     "mfu": (B * T / t) * fpt / peak if peak else None}
    res["ours_over_transformers_tokens_per_s"] = res["ours"]["tokens_per_s"] / res["transformers"]["tokens_per_s"]
    return res                     # both models are freed with this frame


# ---- e. exact mediation on the 7B shape ---------------------------------------------------------------

def part_mediation(model, sh, device, budget) -> dict:
    m, L, H = sh["mediation"], model.n_layers, model.config.num_attention_heads
    heads = [(l, h) for l in range(L) for h in range(H)]
    heads = heads[:: max(1, len(heads) // m["heads"])][: m["heads"]]      # evenly over the layers
    g = torch.Generator().manual_seed(3)
    V = model.config.vocab_size
    prompts = [Prompt(torch.randint(3, V, (m["prompt_len"],), generator=g).tolist(),
                      torch.randint(3, V, (2,), generator=g).tolist(), "") for _ in range(m["prompts"] + 1)]
    z_mean = torch.randn(L, H, model.config.head_dim, generator=g) * 0.5
    model.eval()
    with torch.no_grad():
        extract_iv.aie_exact(model, prompts[:1], z_mean, effect="prob", heads=heads, progress=False)  # warm-up
        per_prompt = []
        t_end = time.perf_counter() + budget
        for p in prompts[1:]:
            sync(device)
            t0 = time.perf_counter()
            extract_iv.aie_exact(model, [p], z_mean, effect="prob", heads=heads, progress=False)
            sync(device)
            per_prompt.append(time.perf_counter() - t0)
            if time.perf_counter() > t_end:
                break
    s = statistics.median(per_prompt)
    all_heads = s * (L * H) / len(heads)      # rows cost about alike (a row patched deep costs less: an upper bound)
    return {"heads_measured": len(heads), "heads_total": L * H, "prompt_tokens": m["prompt_len"],
            "prompts_timed": len(per_prompt), "effect": "prob", "max_rows": 512, "s_per_prompt": s,
            "s_per_prompt_all_heads": all_heads, f"s_all_heads_x{PROMPTS_PER_IV}_prompts": all_heads * PROMPTS_PER_IV}


# ---- d. one guided LoRA step on the 7B shape -----------------------------------------------------------

def memory_plan(cfg: ModelConfig, B: int, T: int, device) -> dict:
    """The dry run's prediction for this step (ivft.memplan), recorded with its error if it fails."""
    try:
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        run = memplan.RunShape(lora_r=LORA_R, lora_targets=LORA_TARGETS, lora_dropout=LORA_DROPOUT, n_tasks=1,
                               model_dtype="bf16", amp="bf16", micro_batch=B, max_len=T, reference=True)
        p = memplan.plan(config_to_hf(cfg, None), run, device_bytes=total)
        return {"available": True, "total_gib": p.total / 2 ** 30,
                "rows_gib": {k: v / 2 ** 30 for k, v in p.rows.items()}, "fits": p.fits()}
    except Exception as e:                          # noqa: BLE001 (an interface mismatch is a finding)
        return {"available": False, "why": f"{type(e).__name__}: {e}"}


def part_lora_7b(model, sh, device, budget) -> dict:
    s = sh["7b"]
    cfg, B, T = model.config, s["batch"], s["seq"]
    lora.add_lora(model, LORA_R, 2 * LORA_R, LORA_DROPOUT, LORA_TARGETS)
    model.train()
    iv = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    g = train.Guidance(ivs=(iv / iv.norm() * 4.0)[None].to(device),                   # (1, C)
                       layers=torch.tensor([round(0.57 * cfg.num_hidden_layers)], device=device),
                       alpha=0.5, train_iv=True, kl_iv=True, kl_weight=1.0, kl_temp=2.0, kl_positions="last")
    lm = train.LossModule(model, guidance=g, reference=train.Reference(model, "original"))   # adapters off
    batch = random_batch(cfg.vocab_size, B, T, n_answer=16, device=device)
    norms = torch.tensor([float((batch["targets"] != -100).sum()), float(B), float(B * T)], device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    parts = {}

    def step():
        with amp:
            loss, p = lm(batch, norms)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        parts.update({k: float(v) for k, v in p.items()})

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(step, device, budget, warmup=1, at_most=3)
    res = {"shape": s, "lora_r": LORA_R, "lora_targets": list(LORA_TARGETS), "lora_dropout": LORA_DROPOUT,
           "weights": "bf16",
           "autocast": "bf16" if device.type == "cuda" else None, "tokens_per_step": B * T,
           "params": sum(p.numel() for p in model.parameters()), "trained_params": sum(p.numel() for p in params),
           "loss_parts": parts, "step_s": statistics.median(times), "steps_timed": len(times),
           "memory_plan": memory_plan(cfg, B, T, device)}
    if device.type == "cuda":
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
        res["device_total_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        if res["memory_plan"].get("available"):
            res["plan_over_measured"] = res["memory_plan"]["total_gib"] / res["peak_allocated_gib"]
    return res


# ---- the run ------------------------------------------------------------------------------------------

def run_part(report: dict, name: str, fn, *a):
    t0 = time.perf_counter()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        out = {"ok": True, **fn(*a)}
    except Exception as e:                       # noqa: BLE001 (every failure is a result to record)
        extra = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], dict) else {}
        out = {"ok": False, "error": f"{type(e).__name__}: {e.args[0] if e.args else e}",
               "traceback": traceback.format_exc()[-2000:], **extra}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    report["parts"][name] = out
    print(f"[gpu_check] {name}: {'ok' if out['ok'] else 'FAILED ' + out['error']} ({out['seconds']} s)", flush=True)
    return out


def environment(device, commit: str | None) -> dict:
    try:
        import transformers      # lazily: a test-only dependency; the other parts run without it
        tv = transformers.__version__
    except ImportError:
        tv = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": tv, "python": platform.python_version(),
            # a copy of the working tree without .git (a GPU machine's) knows its commit only if told
            "code": {**code_version(), **({"commit": commit} if commit else {})},
            "cpu_threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device (the default without CUDA)")
    p.add_argument("--device", default="auto", help="auto (cuda where there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--commit", default=None, help="the commit the files are from, recorded in the JSON "
                   "(default: git's, where the directory is a checkout)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--parts", default="parity,train_guided,throughput_1b,mediation_7b,lora_7b",
                   help="comma-separated parts to run (all by default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    mode = "gpu" if device.type == "cuda" and not args.smoke else "smoke"
    sh, budget, want = SHAPES[mode], BUDGET[mode], set(args.parts.split(","))
    t0 = time.perf_counter()
    report = {"script": "bench/gpu_check.py", "mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **environment(device, args.commit), "parts": {}}
    if "parity" in want:
        run_part(report, "parity", part_parity, sh, device, budget["parity"])
    if "train_guided" in want:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            run_part(report, "train_guided", part_train_guided, mode, device, budget["train_guided"], Path(work),
                     args.threads)
    if "throughput_1b" in want:
        run_part(report, "throughput_1b", part_throughput, sh, device, budget["throughput_1b"], report["device_name"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if want & {"mediation_7b", "lora_7b"}:
        holder = {}

        def build_7b():
            holder["model"] = build(model_config(sh["7b"]), torch.bfloat16, device)
            return {"params": sum(q.numel() for q in holder["model"].parameters()), "shape": sh["7b"]}
        if run_part(report, "build_7b", build_7b)["ok"]:
            if "mediation_7b" in want:      # first: the LoRA step then wraps the same model's layers
                run_part(report, "mediation_7b", part_mediation, holder["model"], sh, device, budget["mediation_7b"])
            if "lora_7b" in want:
                run_part(report, "lora_7b", part_lora_7b, holder["model"], sh, device, budget["lora_7b"])
        holder.clear()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["all_ok"] = all(v["ok"] for v in report["parts"].values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[gpu_check] {mode} mode, {report['seconds']} s, all ok: {report['all_ok']} -> {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
