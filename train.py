"""
Continual instruction tuning, plain or guided by instruction vectors (IVs).

Tasks T_1..T_n are fine-tuned one after another; after every task the model is evaluated on every
training task and on a general-ability suite, and the continual-learning metrics of docs/method.md §5
(AP, BWT, FWT, GP/IP drop) are written to out_dir/results.json.

IV-guided training (docs/method.md §4; the IV paper is Jiang et al., arXiv 2406.12227), per training
task T_j with instruction vector θ_j extracted from the model *before any training*:
  1. progressive intervention: α_t·θ_j is added to the residual stream after layer ℓ at the last
     prompt token (per row) of the model being trained, α_t falling linearly from α_0 to 0 over the
     task's optimizer steps, so the last steps (and inference) run without the IV;
  2. L = CE(answer tokens) + λ·KL(P_θ ‖ P_ref+IV) at temperature τ, where P_ref+IV is the frozen
     reference model (the original, or the previous stage's) with θ_j added at ℓ.
Baselines and the sibling code's loss are presets (--preset; ivft/config.py).

Usage:
    python train.py                     # plain sequential fine-tuning of the embedded SmolLM2-135M
    python train.py --guided            # the same with IV guidance (--quick: a few minutes)
    python train.py --preset fvg --regime lora   # the sibling code's loss in its LoRA regime
    python train.py --guided --resume   # continue an interrupted run in the same out_dir
    torchrun --nproc_per_node 4 train.py --guided --model path/to/hf_dir   # DDP (add --fsdp to shard)

out_dir gets train_config.json, log.txt, results.json ({config, stages: a report per stage, stage 0 =
the original model, metrics, cl}), stage-j/ and last/ (checkpoints: ivft/checkpoint.py).

The file reads top to bottom: flags → the method (α schedule, IV intervention, loss) → train():
data, model, reference and IVs → for each task: for each step: loss → step → log → evaluate →
save. What is not the method is one call into the `ivft` package.

Shapes: B rows, T tokens, C d_model, V vocab, N answer tokens in a batch (legend of model.py).
"""
from __future__ import annotations

import argparse
import functools
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import evaluate
import extract_iv
from ivft import checkpoint as ckpt
from ivft import lora
from ivft.config import (METHOD_PRESETS, REGIME_PRESETS, HelpFormatter, add_iv_flags, add_run_flags, check_launch,
                         needs_reference, resolve_config, uses_iv)
from ivft.data import collate, encode_task, load_task_list, lr_at, stage_pool, step_counts, step_micro_batches, steps_for
from ivft.dist import all_reduce_floats, all_reduce_sum, barrier, resolve_amp, setup_distributed, wrap_for_parallel
from ivft.engine import autocast, lm_head_fp32
from ivft.ivfile import training_ivs, union_of_top_heads
from ivft.runtime import Diverged, Logger, StopFlag, TrainError, run_cli, write_json
from model import Intervention, Transformer

# ---------------------------------------------------------------------------------------------
# Flags, grouped as in nanochat. The presets (--preset / --guided, --regime, --quick) only change
# defaults (ivft/config.py resolves and checks them), so every value they set can be overridden.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("presets").add_argument
    g("--preset", default=None, choices=list(METHOD_PRESETS), help="the method (default plain): plain, replay "
      "(--replay 0.25), lwf (KL to the original, no IV), iv_only, guided, fvg (the FvForgetting code's loss)")
    g("--guided", action="store_true", help="--preset guided: --iv_alpha0 1, --kl_weight 1, --kl_iv (docs/method.md §4)")
    g("--regime", default="full", choices=list(REGIME_PRESETS), help="full fine-tuning, or lora: the sibling "
      "code's LoRA (r 8, α 16, q_proj/v_proj, merged after every task, constant lr); ivft/config.py")
    g("--quick", action="store_true", help="a run of a few minutes: few training/eval examples, one short epoch per task")

    g = p.add_argument_group("model").add_argument
    g("--model", default=None, help="HF directory or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    g("--model_dtype", default="fp32", choices=["fp32", "bf16"],
      help="storage dtype of the weights; bf16 only makes sense for a frozen LoRA base")
    g("--lora_r", type=int, default=None, help="LoRA rank; 0 = full fine-tuning (default 0; 8 under --regime lora)")
    g("--lora_alpha", type=float, default=None, help="LoRA scale numerator (scale = alpha/r) (default 16)")
    g("--lora_dropout", type=float, default=None, help="dropout on the LoRA input (default 0.1)")
    g("--lora_targets", default=None,
      help=f"comma-separated linear layers to adapt ({','.join(lora.KNOWN_TARGETS)}) (default q_proj,v_proj)")
    g("--lora_merge", action=argparse.BooleanOptionalAction, default=None,
      help="merge the adapters into the weights after every task and start fresh ones (as the sibling "
      "code does); --no-lora_merge keeps one adapter for all tasks")

    g = p.add_argument_group("data").add_argument
    g("--tasks", default=None, help="comma-separated training sequence: registry names or task files in any "
      "format tasks.load_task reads (default: tasks.default_sequence())")
    g("--general", default=None, help="comma-separated general-ability suite, or 'none' (default: tasks.general_suite())")
    g("--max_train", type=int, default=None, help="at most this many training examples per task (default 320; 24 under --quick)")
    g("--max_len", type=int, default=256, help="longest training sequence in tokens; longer prompts lose their start")
    g("--replay", type=float, default=None, help="mix in FRACTION x (task size) examples drawn from the earlier "
      "tasks (default 0; 0.25 under --preset replay)")

    g = p.add_argument_group("optimisation").add_argument
    g("--epochs", type=float, default=None, help="epochs per task, fractions allowed (default 1)")
    g("--max_steps", type=int, default=0, help="optimizer steps per task; overrides --epochs")
    g("--batch_size", type=int, default=None, help="examples per optimizer step, all ranks together (default 8)")
    g("--micro_batch", type=int, default=None, help="examples per forward pass per rank (default 8); "
      "batch_size / (micro_batch x ranks) = gradient accumulation steps")
    g("--lr", type=float, default=None, help="peak learning rate (default 1e-4 full, as in the sibling code; 3e-4 LoRA)")
    g("--lr_schedule", default=None, choices=["cosine", "linear", "constant"],
      help="decay after warmup, restarted for every task (default cosine; constant under --regime lora)")
    g("--min_lr_ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    g("--warmup", type=float, default=None, help="warmup: a fraction of the task's steps if < 1, else a number of "
      "steps (default 0.1; 0 under --regime lora)")
    g("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g("--betas", default="0.9,0.999", help="AdamW betas")
    g("--grad_clip", type=float, default=1.0, help="clip the gradient norm; 0 = off")
    g("--seed", type=int, default=0, help="seed of data order, replay sampling and LoRA init")

    g = p.add_argument_group("guidance (docs/method.md §4; --preset sets their defaults: ivft/config.py)").add_argument
    g("--iv_alpha0", type=float, default=None,
      help="starting scale α_0 of the IV added in the trained model (default 0; 1 with --guided)")
    g("--kl_weight", type=float, default=None,
      help="λ of the KL term (default 0; 1 with --guided); without --guided, the KL-to-reference baseline")
    g("--kl_iv", action=argparse.BooleanOptionalAction, default=None,
      help="add the IV to the KL reference (default: with --guided); --no-kl_iv: the reference without the IV (ablation)")
    g("--alpha_schedule", default="linear", choices=["linear", "constant"],
      help="α_t over a task's steps: linear from α_0 to 0, or constant α_0 (ablation)")
    g("--kl_temp", type=float, default=None, help="softmax temperature τ of both KL sides (default 2)")
    g("--kl_positions", default=None, choices=["last", "answer"],
      help="KL at the last prompt token, or at every answer position (default last)")
    g("--kl_ref", default=None, choices=["original", "previous"],
      help="the frozen reference: the model before any training, or after the previous task (default original)")
    g("--kl_min", type=float, default=None, help="count a KL only when above this (default 0 = always; fvg 0.1)")
    g("--kl_gate", default=None, choices=["row", "batch"],
      help="--kl_min applies to each row's KL, or to the micro-batch mean as in the sibling code (default row)")
    g("--kl_all_weight", type=float, default=None,
      help="weight of a second KL over every real position, prompt and answer (default 0 = off; fvg 0.1)")
    g("--head_mse_weight", type=float, default=None, help="weight of the sibling paper's MSE between the top "
      "heads' z and the reference's (without the IV), summed over heads (default 0 = off; fvg 1)")
    g("--head_mse_min", type=float, default=None, help="count a head's MSE only when above this (default 0; fvg 0.01)")
    add_iv_flags(p)      # which IVs: --iv_layer, --iv_file, extraction settings (extract_iv.py's)

    g = p.add_argument_group("evaluation").add_argument
    g("--eval_n", type=int, default=None, help="test examples per task and stage (default 40; 5 under --quick); 0 = no evaluation")
    g("--eval_k_shot", type=int, default=None, help="demonstrations for the in-context (IP) score of the general suite (default 3)")
    g("--eval_batch", type=int, default=128, help="prompts per forward pass and rows per decoding step in "
      "evaluation (evaluate.py's default; lower it for big models)")
    g("--stage0_cache", default=None, metavar="PATH", help="reuse the original model's evaluation from this JSON "
      "file when model, tasks and evaluation flags match (written there otherwise): runs of one study share it")
    g("--eval_metrics", default="needed", choices=["needed", "all"], help="needed: each task's primary score "
      "(+ k-shot for the general suite) and the instruction/knowledge log-probs; all: every metric of evaluate.py")

    add_run_flags(p)     # I/O (out_dir, resume, logging) and system (device, dtype, threads, DDP/FSDP)
    return p


# ---------------------------------------------------------------------------------------------
# The method: α schedule, the IV intervention, the guided loss (docs/method.md §4)

def alpha_at(step: int, total: int, alpha0: float, schedule: str = "linear") -> float:
    """IV scale α_t of optimizer step `step` (0-based) of `total`: α_0 at the first step, exactly 0 at
    the last (so the model ends the task fitted without the IV), linear between."""
    if schedule == "constant" or total <= 1:
        return alpha0
    return alpha0 * (1.0 - step / (total - 1))


def kl_per_row(logits, ref_logits, temp: float):
    """KL(P ‖ Q) per row, P = softmax(logits/τ) (trained), Q = softmax(ref_logits/τ). (..., V) -> (...)"""
    logp = F.log_softmax(logits.float() / temp, dim=-1)
    logq = F.log_softmax(ref_logits.float() / temp, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)     # no τ² factor: the sibling code has none


@dataclass
class Guidance:
    """What the loss needs beyond the batch: set once per run, alpha updated every step."""
    ivs: torch.Tensor | None = None        # (n_tasks, C) the IV of every training task
    layers: torch.Tensor | None = None     # (n_tasks,) injection layer per task
    alpha: float = 0.0                     # α_t of the current step
    train_iv: bool = False                 # add α·IV in the trained model
    ref_iv: bool = False                   # add 1·IV in the reference
    kl_weight: float = 0.0
    kl_temp: float = 2.0
    kl_positions: str = "last"
    kl_min: float = 0.0                    # a KL counts only above this: each row's, or the batch mean's
    kl_gate: str = "row"
    kl_all_weight: float = 0.0             # a second KL over every real position (the sibling code's)
    head_mse_weight: float = 0.0
    head_mse_min: float = 0.0              # a head's MSE counts only above this
    heads: dict | None = None              # {layer: LongTensor of head indices} for the MSE term


def add_iv(g: Guidance, batch: dict, scale, record_z=()) -> Intervention:
    """The IV of each row's task, at that row's last prompt token, after that task's layer."""
    rows_iv = g.ivs[batch["task"]]                                        # (B, C)
    row_layer = g.layers[batch["task"]]                                   # (B,)
    add = {}
    for layer in row_layer.unique().tolist():
        # rows of tasks injected at another layer get a zero vector here
        add[layer] = rows_iv * (row_layer == layer).to(rows_iv.dtype)[:, None]
    return Intervention(pos=batch["last"], add_resid=add, scale=scale, record_z=record_z)


def gate(values, threshold: float, per: str, n_rows: int):
    """The sibling code's thresholds: a KL (or MSE) counts only when above `threshold`, judged per
    row (per="row") or on the micro-batch mean (per="batch"). values: per row or per position."""
    if threshold <= 0:
        return values.sum()
    if per == "row":
        return (values * (values.detach() > threshold)).sum()
    return values.sum() * float(values.detach().sum() / n_rows > threshold)


class LossModule(nn.Module):
    """forward(batch, norms) -> (scalar to backpropagate, detached parts for logging). One module
    around the model, so that DDP/FSDP see the whole computation as one forward.

    norms = (answer tokens, rows) of the whole optimizer step over all ranks: each micro-batch's sums
    are divided by them, so gradient accumulation and any number of DDP ranks give the same gradient
    as one big batch (DDP averages over ranks, hence the factor `world`)."""

    def __init__(self, model: Transformer, world: int = 1, guidance: Guidance | None = None):
        super().__init__()
        self.model, self.world, self.guidance = model, world, guidance or Guidance()
        # the frozen reference: None = the model itself with LoRA adapters off; kept out of the module
        # tree (a plain attribute in a list) so that DDP, state_dict and .parameters() never see it
        self._ref = [None]

    def set_reference(self, ref: Transformer | None):
        self._ref[0] = ref

    @torch.no_grad()
    def reference(self, batch) -> tuple[torch.Tensor, dict]:
        """-> (hidden states (B, T, C) of the reference (+IV), its top heads' z without the IV)."""
        g, ref = self.guidance, self._ref[0]
        ctx = lora.adapters_off(self.model) if ref is None else nullcontext()
        ref = self.model if ref is None else ref
        record = tuple(g.heads) if g.head_mse_weight > 0 else ()
        idx, pad_mask = batch["idx"], batch["pad_mask"]
        if g.kl_positions == "last" and g.kl_all_weight == 0:
            # causal attention: nothing after the last prompt token matters there (for the KL and for
            # the heads' z), so the reference reads only the prompt part of the batch
            T = int(batch["last"].max()) + 1
            idx, pad_mask = idx[:, :T], (pad_mask[:, :T] if pad_mask is not None else None)
        with ctx:
            edit = add_iv(g, batch, 1.0) if g.ref_iv else Intervention(pos=batch["last"], record_z=record)
            h = ref(idx, pad_mask=pad_mask, intervention=edit, return_hidden=True)       # (B, T, C)
            z = edit.z
            if record and g.ref_iv:   # the heads' z are compared with the reference's own, without the IV
                z = Intervention(pos=batch["last"], record_z=record)
                ref(idx, pad_mask=pad_mask, intervention=z)
                z = z.z
        return h, z

    def forward(self, batch, norms):
        g, model = self.guidance, self.model
        n_tok, n_rows, B = norms[0], norms[1], len(batch["idx"])
        record = tuple(g.heads) if g.head_mse_weight > 0 else ()
        edit = add_iv(g, batch, g.alpha, record) if g.train_iv else \
            (Intervention(pos=batch["last"], record_z=record) if record else None)
        h = model(batch["idx"], pad_mask=batch["pad_mask"], intervention=edit, return_hidden=True)
        sel = batch["targets"] != -100                                      # (B, T) answer positions
        # the LM head runs only where something is scored, in fp32 (ivft/engine.py says why)
        logits = lm_head_fp32(model, h[sel])                                 # (N, V): no logits elsewhere
        loss = F.cross_entropy(logits, batch["targets"][sel], reduction="sum") / n_tok
        parts = {"ce": loss.detach()}
        if g.kl_weight > 0 or g.kl_all_weight > 0 or g.head_mse_weight > 0:
            ref_h, ref_z = self.reference(batch)
            ref_head = functools.partial(lm_head_fp32, model if self._ref[0] is None else self._ref[0])
            rows = torch.arange(B)
        if g.kl_weight > 0:
            if g.kl_positions == "last":     # the last prompt token predicts the first answer token
                kl = kl_per_row(lm_head_fp32(model, h[rows, batch["last"]]), ref_head(ref_h[rows, batch["last"]]), g.kl_temp)
                kl = gate(kl, g.kl_min, g.kl_gate, B) / n_rows                                     # (B,) -> ()
            else:
                kl = gate(kl_per_row(logits, ref_head(ref_h[sel]), g.kl_temp), g.kl_min, g.kl_gate, B) / n_tok
            loss = loss + g.kl_weight * kl
            parts["kl"] = kl.detach()
        if g.kl_all_weight > 0:
            real = batch["pad_mask"] if batch["pad_mask"] is not None else torch.ones_like(sel)    # (B, T)
            kl_pos = kl_per_row(lm_head_fp32(model, h[real]), ref_head(ref_h[real]), g.kl_temp)  # (n real,)
            per_row = torch.zeros(B, device=kl_pos.device).index_add(0, real.nonzero()[:, 0], kl_pos)
            kl_all = gate(per_row, g.kl_min, g.kl_gate, B) / n_rows
            loss = loss + g.kl_all_weight * kl_all
            parts["kl_all"] = kl_all.detach()
        if g.head_mse_weight > 0:
            mse = 0.0
            for layer, heads in g.heads.items():
                # z: (B, 1, H, D) at the last prompt token -> the top heads; per head the mean over D
                per_head = (edit.z[layer][:, 0, heads].float() - ref_z[layer][:, 0, heads].float()).pow(2).mean(-1)  # (B, k)
                mse = mse + sum(gate(per_head[:, i], g.head_mse_min, "batch", B) for i in range(len(heads))) / n_rows
            loss = loss + g.head_mse_weight * mse
            parts["mse"] = mse.detach()
        return loss * self.world, parts


# ---------------------------------------------------------------------------------------------
# The run

def train(cfg: dict, step_callback=None) -> dict:
    """Run (or resume) the whole sequence. `step_callback(stage, step, model)` is called after every
    optimizer step (tests use it to interrupt or poison a run). Returns the results dict."""
    d = setup_distributed(cfg["device"])
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    out_dir = Path(cfg["out_dir"])

    # ---- data, model, reference and IVs: everything is checked before anything is written ------
    train_tasks = load_task_list(cfg["tasks"], "default_sequence", "training")
    general = load_task_list(cfg["general"], "general_suite", "general")
    check_launch(cfg, d.world)
    amp_dtype = resolve_amp(cfg, d.device)
    start = ckpt.find_resume(cfg, out_dir, len(train_tasks), d.main, d)
    if start["finished"] is not None:
        return start["finished"]
    state = start["state"]
    model, tok = ckpt.load_base_model(cfg, d.device)
    encoded = [encode_task(tok, t, i, cfg) for i, t in enumerate(train_tasks)]
    # IVs come from the model before any training: extracted (or loaded) before the weights of a
    # resumed run are restored
    ivs = training_ivs(cfg, model, tok, train_tasks, extract_iv.get_iv) if uses_iv(cfg) else {}
    heads = union_of_top_heads(ivs) if cfg["head_mse_weight"] > 0 else None
    if cfg["head_mse_weight"] > 0 and not heads:
        raise TrainError("--head_mse_weight needs IVs whose metadata names their top heads")
    original = ckpt.frozen_copy(model) if ckpt.needs_original_copy(cfg, len(train_tasks)) else None
    if state is not None:
        ckpt.restore_model(model, start["ckpt"], state, cfg, out_dir)

    # ---- from here on we write --------------------------------------------------------------------
    ckpt.start_out_dir(out_dir, cfg, clear=(cfg["overwrite"] and not cfg["resume"]) or start["early_death"], d=d)
    log = Logger(out_dir, cfg, d.main)
    if d.main:
        log.config(cfg)
        for n, (v, l, _) in ivs.items():
            log.line(f"IV {n}: layer {l}, norm {v.norm():.3f}")

    loss_module = LossModule(model, d.world, Guidance(
        ivs=torch.stack([ivs[t.name][0] for t in train_tasks]).to(d.device) if ivs else None,          # (n_tasks, C)
        layers=torch.tensor([ivs[t.name][1] for t in train_tasks], device=d.device) if ivs else None,  # (n_tasks,)
        train_iv=bool(ivs) and (cfg["guided"] or cfg["iv_alpha0"] > 0), ref_iv=bool(ivs) and cfg["kl_iv"], heads=heads,
        **{k: cfg[k] for k in ("kl_weight", "kl_temp", "kl_positions", "kl_min", "kl_gate", "kl_all_weight",
                               "head_mse_weight", "head_mse_min")}))
    results = {"config": cfg, "stages": [], "metrics": {}}

    def evaluate_and_record(label: str):   # on rank 0; under FSDP every rank (each forward gathers all shards)
        cache = cfg["stage0_cache"] if label.startswith("stage 0") else None
        if d.main or cfg["fsdp"]:
            try:
                report = evaluate.evaluate_stage(model, tok, train_tasks, general, cfg, label, amp_dtype,
                                                 cache=cache, write_cache=d.main)
            except OSError as e:        # the --stage0_cache file could not be written
                raise TrainError(str(e)) from None
        if d.main:
            evaluate.record_stage(results, report, train_tasks, general)
            write_json(out_dir / "results.json", results)
        barrier(d)

    # the global RNG drives LoRA init and dropout: seeded once here, the same on every rank (FSDP
    # keeps each rank's shard of a freshly initialised adapter, so all ranks must draw the same
    # init); on resume it is what it was at the checkpoint (set again below for a mid-task stage)
    start_stage, start_step = (state["stage_done"], state["step"]) if state is not None else (0, 0)
    if state is not None:
        results["stages"] = state["stages"]
        log.line(f"resuming from {start['ckpt']}: {start_stage} task(s) done, step {start_step} of the next")
        ckpt.set_rng_state(state, d.rank)
    else:
        if cfg["eval_n"] > 0:
            evaluate_and_record("stage 0 (original model)")
        torch.manual_seed(cfg["seed"])
        random.seed(cfg["seed"])

    for j, task in enumerate(train_tasks):
        if j < start_stage:
            continue
        # ---- adapters, reference and optimizer of this task ---------------------------------------
        if cfg["lora_r"] > 0 and not lora.has_lora(model):
            lora.add_lora(model, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"].split(","))
        if needs_reference(cfg):
            loss_module.set_reference(ckpt.pick_reference(j, original, cfg, out_dir, model.model.embed_tokens.weight))
        # wrapped first: FSDP replaces the parameters by sharded ones, which the optimizer must hold
        wrapped = wrap_for_parallel(loss_module, cfg, d)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(float(x) for x in cfg["betas"].split(",")),
                                weight_decay=cfg["weight_decay"])
        step = 0
        if state is not None and j == start_stage and start_step > 0:     # resuming mid-task
            ckpt.load_optimizer(opt, state, cfg, loss_module)
            ckpt.set_rng_state(state, d.rank)
            step = start_step
        pool = stage_pool(encoded, j, cfg)
        total = steps_for(len(pool), cfg)
        model.train()

        def save_last(at_step):
            ckpt.save_mid_task(out_dir, model, tok, cfg, opt, loss_module, j, at_step, rng_boundary, results["stages"], d)

        bar = tqdm(total=total, initial=step, desc=f"task {j + 1}/{len(train_tasks)} {task.name}",
                   disable=not d.main, dynamic_ncols=True)
        rng_boundary = ckpt.rng_state()          # the RNG as it was after the last completed step
        t_log, tok_log, in_update = time.time(), 0, False
        try:
            with StopFlag() as stop:
                while step < total:
                    # ---- one optimizer step: micro-batches -> loss -> backward -> clip -> update ------
                    t0 = time.time()
                    micro = [collate(c, tok.pad_id, d.device) for c in step_micro_batches(pool, step, cfg, j, d.rank, d.world)]
                    # normalisers of the whole step over all ranks (see LossModule)
                    n_ans, n_rows, n_seen = all_reduce_sum(step_counts(micro, d.device), d).tolist()
                    # as a tensor, not floats: torch.compile would specialise on every new value
                    norms = torch.tensor([n_ans, n_rows], device=d.device)
                    loss_module.guidance.alpha = alpha = alpha_at(step, total, cfg["iv_alpha0"], cfg["alpha_schedule"])
                    lr = lr_at(step, total, cfg)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    logged = {}
                    for i, batch in enumerate(micro):
                        # DDP: all-reduce the gradients only after the last micro-batch
                        sync = i == len(micro) - 1 or not hasattr(wrapped, "no_sync")
                        with nullcontext() if sync else wrapped.no_sync():
                            with autocast(amp_dtype, d.device.type):
                                loss, parts = wrapped(batch, norms)
                            loss.backward()
                        for k, v in parts.items():
                            logged[k] = logged.get(k, 0.0) + v.float()
                    logged = all_reduce_floats(logged, d)
                    weights = {"ce": 1.0, "kl": cfg["kl_weight"], "kl_all": cfg["kl_all_weight"], "mse": cfg["head_mse_weight"]}
                    total_loss = sum(weights[k] * v for k, v in logged.items())
                    if not math.isfinite(total_loss):
                        raise Diverged(f"loss is {total_loss} at task {j + 1} ({task.name}) step {step + 1}/{total} "
                                       f"(lr {lr:.2e}): stopped without saving; last good checkpoint: "
                                       f"{ckpt.newest_checkpoint(out_dir) or 'none'}. Try a lower --lr")
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
                    in_update = True    # a second Ctrl-C in here leaves half-updated weights: not saved
                    opt.step()
                    in_update = False
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    rng_boundary = ckpt.rng_state()
                    if step_callback is not None:
                        step_callback(j, step, model)

                    # ---- log, save, stop ------------------------------------------------------------
                    dt = time.time() - t0
                    tok_log += n_seen
                    bar.update(1)
                    bar.set_postfix(loss=f"{total_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{n_seen / max(dt, 1e-9):.0f}")
                    if step % cfg["log_every"] == 0 or step == total:
                        log.step(f"task {j + 1}/{len(train_tasks)} {task.name}", step, total, total_loss, logged, alpha,
                                 lr, float(gnorm), tok_log / max(time.time() - t_log, 1e-9), dt, task=j + 1)
                        t_log, tok_log = time.time(), 0
                    if cfg["save_every"] and step % cfg["save_every"] == 0 and step < total:
                        save_last(step)
                    # every rank stops at the same step, or DDP's collectives would hang
                    if all_reduce_sum(torch.tensor([float(stop.requested)], device=d.device), d).item() > 0:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()  # before any message, so that it starts on a line of its own
            if in_update:
                log.line("interrupted inside an optimizer update: nothing saved, the last checkpoint is kept")
                raise
            save_last(step)
            log.line(f"interrupted at task {j + 1} step {step}/{total}: saved {out_dir / 'last'}; "
                     "rerun the same command with --resume to continue")
            raise
        finally:
            bar.close()

        # ---- end of the task: evaluate, merge, checkpoint ---------------------------------------
        if cfg["eval_n"] > 0:
            try:
                # before merging: a Ctrl-C here saves the trained task (step = total) with its adapters
                # as they are, and --resume goes straight to this evaluation
                evaluate_and_record(f"stage {j + 1} (after {task.name})")
            except KeyboardInterrupt:
                save_last(total)
                log.line(f"interrupted while evaluating task {j + 1}: saved {out_dir / 'last'}; "
                         "rerun the same command with --resume to continue")
                raise
        if cfg["lora_r"] > 0 and cfg["lora_merge"]:
            lora.merge(model)
        path = ckpt.save_stage(out_dir, model, tok, cfg, j + 1, results["stages"], [t.name for t in train_tasks], d)
        if d.main:
            write_json(out_dir / "results.json", results)
            log.line(f"task {j + 1}/{len(train_tasks)} {task.name} done: saved {path}")
        barrier(d)
        model.train()

    if d.main:
        write_json(out_dir / "results.json", results)
        log.final(results["metrics"], out_dir / "results.json")
    barrier(d)
    return results


def main(argv=None, step_callback=None) -> dict:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: train(resolve_config(args), step_callback=step_callback))


if __name__ == "__main__":
    main()
