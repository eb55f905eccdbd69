"""
Continual instruction tuning, plain or guided by instruction vectors (IVs).

Tasks T_1..T_n are fine-tuned one after another; after each, every training task and a general-ability
suite are evaluated, and the continual-learning metrics of docs/method.md §5 go to out_dir/results.json.

IV-guided training (docs/method.md §4; Jiang et al., arXiv 2406.12227), per task T_j with the
instruction vector θ_j extracted from the model *before any training*:
  1. progressive intervention: α_t·θ_j is added to the residual stream after block ℓ at each row's
     last prompt token, α_t falling linearly from α_0 to 0 over the task's steps (inference: no IV);
  2. L = CE(answer tokens) + λ·KL(P_θ ‖ P_ref+IV) at temperature τ, P_ref+IV = the frozen reference
     (the original, or the previous stage's: ivft/reference.py) with θ_j added after block ℓ.
Baselines and the sibling code's loss are presets (--preset; ivft/config.py).

    python train.py --guided --quick    # a few minutes; drop --guided for plain fine-tuning
    python train.py --preset fvg --regime lora   # the sibling code's loss in its LoRA regime
    python train.py --guided --resume   # continue an interrupted run in the same out_dir
    torchrun --nproc_per_node 4 train.py --guided --model path/to/hf_dir   # DDP (add --fsdp to shard)

Reads top to bottom: flags → the method (schedules, IV intervention, loss) → train(): data, model,
IVs → per task: per step: loss → step → log; evaluate → save. The rest is one call into `ivft`.
Shapes: B rows, T tokens, C d_model, V vocab, N answer tokens in a batch (legend of model.py).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import evaluate
import extract_iv
from ivft import checkpoint as ckpt
from ivft import lora
from ivft.config import (METHOD_PRESETS, REGIME_PRESETS, HelpFormatter, add_run_flags, check_launch,
                         needs_reference, resolve_config, uses_iv)
from ivft.data import (collate, encode_task, load_task_list, stage_pool, step_counts, step_micro_batches,
                       steps_for)
from ivft.dist import (accumulate_gradients, all_reduce_floats, all_reduce_sum, barrier, resolve_amp,
                       setup_distributed, wrap_for_parallel)
from ivft.engine import lm_head_fp32
from ivft.files import RunLock
from ivft.ivfile import model_tag, union_of_top_heads
from ivft.reference import needs_original_copy, pick_reference
from ivft.report import term_means
from ivft.runtime import Diverged, Logger, StopFlag, code_version, run_cli, write_json
from model import Intervention, Transformer

# ---------------------------------------------------------------------------------------------
# Flags, grouped as in nanochat. The presets (--preset / --guided, --regime, --quick) only change
# defaults (ivft/config.py resolves and checks them), so every value they set can be overridden.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("presets").add_argument
    g("--preset", default=None, choices=list(METHOD_PRESETS), help="the method (default plain): plain, "
      "replay, lwf (KL to the original, no IV), iv_only, guided, fvg (the FvForgetting code's loss); "
      "each flag's help says what the presets set")
    g("--guided", action="store_true",
      help="--preset guided: progressive IV + KL to the reference with the IV (docs/method.md §4)")
    g("--regime", default="full", choices=list(REGIME_PRESETS), help="full fine-tuning, or lora: the sibling "
      "code's LoRA (merged after every task, constant lr)")
    g("--quick", action="store_true", help="a run of a few minutes: few examples and steps per task")

    g = p.add_argument_group("data").add_argument
    g("--tasks", default=None, help="comma-separated training sequence: registry names or task files in any "
      "format tasks.load_task reads (default: tasks.default_sequence())")
    g("--general", default=None,
      help="comma-separated general-ability suite, or 'none' (default: tasks.general_suite())")
    g("--max_train", type=int, default=None, help="at most this many training examples per task")
    g("--max_len", type=int, default=256, help="longest training sequence; longer prompts lose their start")
    g("--replay", type=float, default=None, help="add FRACTION x (task size) examples of the earlier tasks")

    g = p.add_argument_group("optimisation").add_argument
    g("--epochs", type=float, default=None, help="epochs per task, fractions allowed")
    g("--max_steps", type=int, default=None, help="optimizer steps per task, 0 = from --epochs")
    g("--batch_size", type=int, default=None, help="examples per optimizer step, all ranks together")
    g("--micro_batch", type=int, default=None, help="examples per forward pass per rank (default: the "
      "largest divisor <= 8 of the batch per rank); batch_size / (micro_batch x ranks) = accumulation steps")
    g("--lr", type=float, default=None, help="peak learning rate (3e-4 whenever --lora_r > 0)")
    g("--lr_schedule", default=None, choices=["cosine", "linear", "constant"],
      help="decay after warmup, restarted for every task")
    g("--min_lr_ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    g("--warmup", type=float, default=None, help="warmup: a fraction of the task's steps if < 1, else steps")
    g("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g("--betas", default="0.9,0.999", help="AdamW betas")
    g("--grad_clip", type=float, default=1.0, help="clip the gradient norm; 0 = off")
    g("--seed", type=int, default=0, help="seed of data order, replay sampling and LoRA init")

    g = p.add_argument_group("guidance (docs/method.md §4)").add_argument
    g("--iv_alpha0", type=float, default=None, help="starting scale α_0 of the IV in the trained model")
    g("--iv_norm_ratio", type=float, default=0.0, help="rescale each IV to this fraction of the mean hidden-"
      "state norm at its layer on its training prompts, in model and reference alike (0: as extracted)")
    g("--kl_weight", type=float, default=None, help="λ of the KL term; without an IV: the lwf baseline")
    g("--kl_iv", action=argparse.BooleanOptionalAction, default=None,
      help="add the IV to the KL reference; --no-kl_iv: the reference without the IV (ablation)")
    g("--alpha_schedule", default="linear", choices=["linear", "constant"],
      help="α_t over a task's steps: linear from α_0 to 0, or constant α_0 (ablation)")
    g("--kl_temp", type=float, default=None, help="softmax temperature τ of both KL sides")
    g("--kl_positions", default=None, choices=["last", "answer", "all"],
      help="KL at the last prompt token, at every answer position, or at every real position")
    g("--kl_ref", default=None, choices=["original", "previous"],
      help="the frozen reference: the model before any training, or after the previous task")
    g("--kl_min", type=float, default=None, help="count a KL only when above this (0 = always)")
    g("--kl_gate", default=None, choices=["row", "batch"],
      help="--kl_min applies to each row's KL, or to the micro-batch mean as in the sibling code")
    g("--kl_all_weight", type=float, default=None,
      help="weight of a second KL over every real position, prompt and answer (0 = off)")
    g("--head_mse_weight", type=float, default=None, help="weight of the sibling paper's MSE between the top "
      "heads' z and the reference's (without the IV), summed over heads (0 = off)")
    g("--head_mse_min", type=float, default=None, help="count a head's MSE only when above this")
    g("--free_kl_weight", type=float, default=0.0, help="weight of KL(P_θ ‖ P_ref) at the last token of "
      "the batch's prompts without the instruction (beyond the paper: where it is absent, behave as before)")

    g = p.add_argument_group("instruction vectors (extracted and cached by extract_iv.py)").add_argument
    g("--iv_layer", type=int, default=None, help="add the IVs after this block (0-based); default: each IV's "
      "own (extract_iv.py's); any layer reuses the cached IV")
    g("--iv_dir", default=None, help="IV cache: <iv_dir>/<model tag>/<task>.safetensors (<name>-<data "
      "hash> for a task file), the layout extract_iv.py writes")
    g("--iv_method", default="exact", choices=["exact", "attribution"], help="AIE computation")
    g("--iv_n_clean", type=int, default=None, help="clean prompts averaged into the heads' mean z")
    g("--iv_n_corrupt", type=int, default=None, help="corrupted prompts averaged into the AIE")
    g("--iv_top_k", type=int, default=None, help="heads in the IV (default: extract_iv.py's)")
    g("--iv_file", action="append", default=[], metavar="TASK=PATH",
      help="use this IV file for TASK instead of extracting one (repeatable)")

    evaluate.add_stage_flags(p)    # --eval_n, --eval_k_shot, ...: how each stage is evaluated
    add_run_flags(p)     # the model and LoRA, I/O (out_dir, resume, log), system (device, dtype, DDP/FSDP)
    return p


# ---------------------------------------------------------------------------------------------
# The method: α schedule, the IV intervention, the guided loss (docs/method.md §4)

def alpha_at(step: int, total: int, alpha0: float, schedule: str = "linear") -> float:
    """IV scale α_t of optimizer step `step` (0-based) of `total`: α_0 at the first step, exactly 0 at
    the last (so the model ends the task fitted without the IV), linear between."""
    if schedule == "constant" or total <= 1:
        return alpha0
    return alpha0 * (1.0 - step / (total - 1))


def lr_at(step: int, total: int, peak: float, schedule: str = "cosine", warmup: float = 0.0,
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate of step `step` of `total`, restarted for every task: linear warmup (a fraction of
    the task's steps if < 1, else a number of steps), then cosine, linear or constant down to
    min_lr_ratio x peak at the last step."""
    warm = int(warmup * total) if warmup < 1 else int(warmup)
    low = peak * min_lr_ratio
    if step < warm:
        return peak * (step + 1) / warm
    if schedule == "constant" or total - warm <= 1:
        return peak
    progress = (step - warm) / (total - warm - 1)          # 0 at the first step after warmup, 1 at the last
    if schedule == "linear":
        return peak + (low - peak) * progress
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))


def kl_per_row(logits, ref_logits, temp: float):
    """KL(P ‖ Q) per row, P = softmax(logits/τ) (trained), Q = softmax(ref_logits/τ). (..., V) -> (...)"""
    logp = F.log_softmax(logits.float() / temp, dim=-1)
    logq = F.log_softmax(ref_logits.float() / temp, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)     # no τ² factor: the sibling code has none


@dataclass
class Guidance:
    """What the loss needs beyond the batch; the fields named like flags come from them (from_flags)."""
    ivs: torch.Tensor | None = None        # (n_tasks, C) the IV of every training task
    layers: torch.Tensor | None = None     # (n_tasks,) injection layer per task
    alpha: float = 0.0                     # α_t of the current step
    train_iv: bool = False                 # add α·IV in the trained model
    kl_iv: bool = False                    # add 1·IV in the reference
    kl_weight: float = 0.0
    kl_temp: float = 2.0
    kl_positions: str = "last"
    kl_min: float = 0.0                    # a KL counts only above this: each row's, or the batch mean's
    kl_gate: str = "row"
    kl_all_weight: float = 0.0             # a second KL over every real position (the sibling code's)
    head_mse_weight: float = 0.0
    head_mse_min: float = 0.0              # a head's MSE counts only above this
    heads: dict | None = None              # {layer: LongTensor of head indices} for the MSE term
    free_kl_weight: float = 0.0            # the KL on the prompts without the instruction

    @classmethod
    def from_flags(cls, cfg: dict, **given):
        flags = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg and f.name not in given}
        return cls(**flags, **given)


def add_iv(g: Guidance, batch: dict, scale, record_z=()) -> Intervention:
    """The IV of each row's task, at that row's last prompt token, after that task's layer."""
    rows_iv = g.ivs[batch["task"]]                                        # (B, C)
    row_layer = g.layers[batch["task"]]                                   # (B,)
    add = {}
    for layer in row_layer.unique().tolist():
        # rows of tasks injected at another layer get a zero vector here
        add[layer] = rows_iv * (row_layer == layer).to(rows_iv.dtype)[:, None]
    return Intervention(pos=batch["last"], add_resid=add, scale=scale, record_z=record_z)


def real_positions(batch):
    # (B, T) True at the batch's real (not padded) positions
    return torch.ones_like(batch["targets"], dtype=torch.bool) if (m := batch["pad_mask"]) is None else m


def gate(values, threshold: float, per: str, n_rows: int):
    """The sibling code's thresholds: values (per row or position) count only above `threshold`, judged
    per row (per="row") or on the micro-batch mean (per="batch")."""
    if threshold <= 0:
        return values.sum()
    if per == "row":
        return (values * (values.detach() > threshold)).sum()
    return values.sum() * float(values.detach().sum() / n_rows > threshold)


class LossModule(nn.Module):
    """forward(batch, norms) -> (weighted total to backpropagate, {term: weighted value, detached}): one
    module around the model, so that DDP/FSDP see one forward; the log, the divergence check and the
    reports iterate over the terms that come back. norms = (answer tokens, rows, real tokens) of the whole
    step over all ranks: each micro-batch's sums are divided by them, so gradient accumulation and any
    number of DDP ranks give one big batch's gradient (DDP averages over ranks, hence `world`)."""

    def __init__(self, model: Transformer, world: int = 1, guidance: Guidance | None = None):
        super().__init__()
        self.model, self.world, self.guidance = model, world, guidance or Guidance()
        # the frozen reference: None = the model itself with LoRA adapters off; kept out of the module
        # tree (a plain attribute in a list) so that DDP, state_dict and .parameters() never see it
        self._ref = [None]

    def set_reference(self, ref: Transformer | None):
        self._ref[0] = ref

    def forward(self, batch, norms, keep_graph: bool = False):
        # The paper's loss: CE(answer) + λ·KL(P_θ ‖ P_ref+IV) with α_t·IV in the trained model
        g, model = self.guidance, self.model
        n_tok, n_rows, B = norms[0], norms[1], len(batch["idx"])
        record = tuple(g.heads) if g.head_mse_weight > 0 else ()
        edit = add_iv(g, batch, g.alpha, record) if g.train_iv else \
            (Intervention(pos=batch["last"], record_z=record) if record else None)
        h = model(batch["idx"], pad_mask=batch["pad_mask"], intervention=edit, return_hidden=True)
        sel = batch["targets"] != -100                                      # (B, T) answer positions
        # the LM head runs only where something is scored, in fp32 (ivft/engine.py says why)
        logits = lm_head_fp32(model, h[sel])                                 # (N, V): no logits elsewhere
        parts = {"ce": F.cross_entropy(logits, batch["targets"][sel], reduction="sum") / n_tok}
        # the frozen reference's hidden states and heads' z: run once, by the first term that needs them
        ref = functools.cache(lambda: self.reference(batch))
        ref_head = functools.partial(lm_head_fp32, model if self._ref[0] is None else self._ref[0])
        if g.kl_weight > 0:
            ref_h = ref()[0]
            if g.kl_positions == "last":     # the last prompt token predicts the first answer token
                at = torch.arange(B), batch["last"]
                kl = kl_per_row(lm_head_fp32(model, h[at]), ref_head(ref_h[at]), g.kl_temp)       # (B,)
                kl = gate(kl, g.kl_min, g.kl_gate, B) / n_rows
            elif g.kl_positions == "answer":
                kl = gate(kl_per_row(logits, ref_head(ref_h[sel]), g.kl_temp), g.kl_min, g.kl_gate, B) / n_tok
            else:                            # every real position, prompt and answer
                real = real_positions(batch)
                kl = kl_per_row(lm_head_fp32(model, h[real]), ref_head(ref_h[real]), g.kl_temp)
                kl = gate(kl, g.kl_min, g.kl_gate, B) / norms[2]
            parts["kl"] = g.kl_weight * kl
        if g.free_kl_weight > 0:
            parts["free_kl"] = g.free_kl_weight * self.instruction_free_kl(batch, ref_head, n_rows)
        parts.update(self.sibling_terms(batch, h, ref, ref_head, edit, n_rows))
        loss = sum(parts.values())
        return loss * self.world, parts if keep_graph else {k: v.detach() for k, v in parts.items()}

    def instruction_free_kl(self, batch, ref_head, n_rows):
        """Beyond the paper: KL(P_θ ‖ P_ref) at the last token of the same rows' prompts without the
        task's instruction (the input alone), the reference without the IV. The KL on the task's own
        prompts cannot see the new format leaking into prompts with other instructions; this one does."""
        at = torch.arange(len(batch["idx"])), batch["free_last"]
        h = self.model(batch["free"], pad_mask=batch["free_mask"], return_hidden=True)[at]         # (B, C)
        with torch.no_grad(), self.reference_model() as ref:
            ref_h = ref(batch["free"], pad_mask=batch["free_mask"], return_hidden=True)[at]
        return kl_per_row(lm_head_fp32(self.model, h), ref_head(ref_h), self.guidance.kl_temp).sum() / n_rows

    def sibling_terms(self, batch, h, ref, ref_head, edit, n_rows) -> dict:
        """The FvForgetting code's extra terms (--preset fvg): a KL over every real position and the
        MSE between the top heads' z and the reference's, each gated like its KL."""
        g, model, B, out = self.guidance, self.model, len(batch["idx"]), {}
        if g.kl_all_weight > 0:
            real = real_positions(batch)
            kl_pos = kl_per_row(lm_head_fp32(model, h[real]), ref_head(ref()[0][real]), g.kl_temp)  # (n,)
            per_row = torch.zeros(B, device=kl_pos.device).index_add(0, real.nonzero()[:, 0], kl_pos)
            out["kl_all"] = g.kl_all_weight * (gate(per_row, g.kl_min, g.kl_gate, B) / n_rows)
        if g.head_mse_weight > 0:
            mse = 0.0
            for layer, heads in g.heads.items():
                # z: (B, 1, H, D) at the last prompt token -> the top heads; per head the mean over D
                diff = edit.z[layer][:, 0, heads].float() - ref()[1][layer][:, 0, heads].float()  # (B, k, D)
                per_head = diff.pow(2).mean(-1)                                                  # (B, k)
                gated = [gate(per_head[:, i], g.head_mse_min, "batch", B) for i in range(len(heads))]
                mse = mse + sum(gated) / n_rows
            out["mse"] = g.head_mse_weight * mse
        return out

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference: a model of its own, or the trained one with its LoRA adapters off."""
        with lora.adapters_off(self.model) if self._ref[0] is None else contextlib.nullcontext():
            yield self.model if self._ref[0] is None else self._ref[0]

    @torch.no_grad()
    def reference(self, batch) -> tuple[torch.Tensor, dict]:
        """-> (hidden states (B, T, C) of the reference (+IV), its top heads' z without the IV)."""
        g = self.guidance
        record = tuple(g.heads) if g.head_mse_weight > 0 else ()
        idx, pad_mask = batch["idx"], batch["pad_mask"]
        if g.kl_positions == "last" and g.kl_all_weight == 0:
            # causal attention: nothing after the last prompt token matters there (for the KL and for
            # the heads' z), so the reference reads only the prompt part of the batch
            T = int(batch["last"].max()) + 1
            idx, pad_mask = idx[:, :T], (pad_mask[:, :T] if pad_mask is not None else None)
        with self.reference_model() as ref:
            edit = add_iv(g, batch, 1.0) if g.kl_iv else Intervention(pos=batch["last"], record_z=record)
            h = ref(idx, pad_mask=pad_mask, intervention=edit, return_hidden=True)       # (B, T, C)
            z = edit.z
            if record and g.kl_iv:   # the heads' z are compared with the reference's own, without the IV
                z = Intervention(pos=batch["last"], record_z=record)
                ref(idx, pad_mask=pad_mask, intervention=z)
                z = z.z
        return h, z


# ---------------------------------------------------------------------------------------------
# The run

def train(cfg: dict, step_callback=None) -> dict:
    """Run (or resume) the whole sequence. `step_callback(stage, step, model)` is called after every
    optimizer step (tests use it to interrupt or poison a run). Returns the results dict."""
    d = setup_distributed(cfg["device"])
    check_launch(cfg, d.world)        # before the lock, which creates out_dir: is it writable at all?
    # one writer per run folder: rank 0 holds out_dir/run.lock while it runs (a second train.py, or a
    # study driver's orphan, is refused in one line); released and removed when train() ends
    with RunLock(cfg["out_dir"], what=f"--out_dir {cfg['out_dir']}") if d.main else contextlib.nullcontext():
        # the git commit (+ a hash of uncommitted changes) it runs on: train_config.json, results.json
        return run_sequence({**cfg, "code": code_version()}, d, step_callback)


def run_sequence(cfg: dict, d, step_callback) -> dict:
    torch.set_num_threads(cfg["num_threads"] or torch.get_num_threads())
    out_dir = Path(cfg["out_dir"])

    # ---- data, model, reference and IVs: everything is checked before anything is written ------
    train_tasks = load_task_list(cfg["tasks"], "default_sequence", "training")
    general = load_task_list(cfg["general"], "general_suite", "general")
    amp_dtype = resolve_amp(cfg["dtype"], d.device)
    adapters = (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], tuple(cfg["lora_targets"].split(",")))
    spec = lora.LoraSpec(*adapters, cfg["lora_merge"]) if cfg["lora_r"] > 0 else None
    run = ckpt.RunFiles(out_dir, cfg, cfg["model"], cfg["fsdp"], spec)
    stage_eval = evaluate.StageEval(cfg["eval_n"], cfg["eval_k_shot"], cfg["eval_batch"], cfg["eval_metrics"])
    evaluate.read_stage_cache(cfg["stage0_cache"])       # a bad file fails now, not after stage 0
    start = ckpt.find_resume(run, len(train_tasks), cfg["resume"], cfg["overwrite"], d.main, d)
    if start["finished"] is not None:
        return start["finished"]
    state = start["state"]
    model, tok = ckpt.load_base_model(cfg["model"], cfg["model_dtype"], d.device)
    encoded = [encode_task(tok, t, i, cfg["max_len"], cfg["max_train"], free=cfg["free_kl_weight"] > 0)
               for i, t in enumerate(train_tasks)]
    # IVs come from the model before any training: extracted (or loaded) before a resumed run's weights
    ivs = {} if not uses_iv(cfg) else extract_iv.training_ivs(
        model, tok, train_tasks, iv_dir=cfg["iv_dir"], model_id=model_tag(cfg["model"]),
        layer=cfg["iv_layer"], files=dict(f.split("=", 1) for f in cfg["iv_file"]), method=cfg["iv_method"],
        norm_ratio=cfg["iv_norm_ratio"], n_clean=cfg["iv_n_clean"], n_corrupt=cfg["iv_n_corrupt"],
        top_k=cfg["iv_top_k"])
    heads = union_of_top_heads(ivs) if cfg["head_mse_weight"] > 0 else None     # {} raises there
    keep_original = needs_reference(cfg) and needs_original_copy(cfg["kl_ref"], spec, len(train_tasks))
    original = ckpt.frozen_copy(model) if keep_original else None
    if state is not None:
        ckpt.restore_model(model, start["ckpt"], state, spec, out_dir)

    # ---- from here on we write --------------------------------------------------------------------
    ckpt.start_out_dir(run, clear=(cfg["overwrite"] and not cfg["resume"]) or start["early_death"], d=d)
    log = Logger(out_dir, d.main, cfg["wandb_project"] if cfg["wandb"] else None, cfg)
    if d.main:
        log.config(cfg)
        for n, (v, l, _) in ivs.items():
            log.line(f"IV {n}: layer {l}, norm {v.norm():.3f}")

    per_task = [ivs[t.name] for t in train_tasks] if ivs else None
    loss_module = LossModule(model, d.world, Guidance.from_flags(
        cfg, ivs=torch.stack([v for v, _, _ in per_task]).to(d.device) if ivs else None,       # (n_tasks, C)
        layers=torch.tensor([l for _, l, _ in per_task], device=d.device) if ivs else None,      # (n_tasks,)
        train_iv=bool(ivs) and (cfg["guided"] or cfg["iv_alpha0"] > 0), kl_iv=bool(ivs) and cfg["kl_iv"],
        heads=heads))
    results = {"config": cfg, "stages": [], "metrics": {}, "training": []}
    regularised = uses_iv(cfg) or needs_reference(cfg)     # more terms than ce: log their gradient shares

    def evaluate_and_record(label: str):   # on rank 0; under FSDP every rank (each forward gathers shards)
        cache = cfg["stage0_cache"] if label.startswith("stage 0") else None
        if d.main or cfg["fsdp"]:
            report = evaluate.evaluate_stage(model, tok, train_tasks, general, stage_eval, label, amp_dtype,
                                             cache=cache, write_cache=d.main)
        if d.main:
            evaluate.record_stage(results, report, train_tasks, general)
            write_json(out_dir / "results.json", results)
        barrier(d)

    # the global RNG drives LoRA init and dropout: seeded once here, the same on every rank (FSDP
    # keeps each rank's shard of a freshly initialised adapter, so all ranks must draw the same
    # init); on resume it is what it was at the checkpoint (set again below for a mid-task stage)
    start_stage, start_step = (state["stage_done"], state["step"]) if state is not None else (0, 0)
    if state is not None:
        results["stages"], results["training"] = state["stages"], state.get("training", [])
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
            lora.add_lora(model, spec.r, spec.alpha, spec.dropout, list(spec.targets))
        if needs_reference(cfg):
            loss_module.set_reference(pick_reference(j, original, cfg["kl_ref"], spec, out_dir,
                                                     model.model.embed_tokens.weight))
        # wrapped first: FSDP replaces the parameters by sharded ones, which the optimizer must hold
        wrapped = wrap_for_parallel(loss_module, d, cfg["compile"], cfg["fsdp"])
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(float(x) for x in cfg["betas"].split(",")),
                                weight_decay=cfg["weight_decay"])
        step, term_log = 0, []        # term_log: the loss's terms and gradient shares at log steps
        if state is not None and j == start_stage and start_step > 0:     # resuming mid-task
            ckpt.load_optimizer(opt, state, cfg["fsdp"], loss_module)
            ckpt.set_rng_state(state, d.rank)
            step, term_log = start_step, state.get("term_log", [])
        pool = stage_pool(encoded, j, cfg["replay"], cfg["seed"])
        total = steps_for(len(pool), cfg["batch_size"], cfg["epochs"], cfg["max_steps"])
        model.train()

        def save_last(at_step):
            ckpt.save_mid_task(run, model, tok, opt, loss_module, j, at_step, rng_boundary, results["stages"],
                               d, training=results["training"], term_log=term_log)

        where = f"task {j + 1}/{len(train_tasks)} {task.name}"
        bar = tqdm(total=total, initial=step, desc=where, disable=not d.main, dynamic_ncols=True)
        rng_boundary = ckpt.rng_state()          # the RNG as it was after the last completed step
        t_log, tok_log, in_update, evaluating = time.time(), 0, False, False
        try:
            with StopFlag() as stop:
                while step < total:
                    # ---- one optimizer step: micro-batches -> loss -> backward -> clip -> update ------
                    t0 = time.time()
                    micro = [collate(c, tok.pad_id, d.device) for c in step_micro_batches(
                        pool, step, j, batch_size=cfg["batch_size"], micro_batch=cfg["micro_batch"],
                        seed=cfg["seed"], rank=d.rank, world=d.world)]
                    # normalisers of the whole step over all ranks (see LossModule)
                    n_ans, n_rows, n_seen = all_reduce_sum(step_counts(micro, d.device), d).tolist()
                    # as a tensor, not floats: torch.compile would specialise on every new value
                    norms = torch.tensor([n_ans, n_rows, n_seen], device=d.device)
                    alpha = alpha_at(step, total, cfg["iv_alpha0"], cfg["alpha_schedule"])
                    loss_module.guidance.alpha = alpha
                    lr = lr_at(step, total, cfg["lr"], cfg["lr_schedule"], cfg["warmup"], cfg["min_lr_ratio"])
                    for group in opt.param_groups:
                        group["lr"] = lr
                    log_now = (step + 1) % cfg["log_every"] == 0 or step + 1 == total
                    logged, shares = accumulate_gradients(wrapped, micro, norms, amp_dtype, d.device.type,
                                                          params if log_now and regularised else None)
                    logged = all_reduce_floats(logged, d)          # {term: weighted value} over the step
                    total_loss = sum(logged.values())
                    if not math.isfinite(total_loss):
                        raise Diverged(f"loss is {total_loss} at {where} step {step + 1}/{total} (lr "
                                       f"{lr:.2e}): stopped without saving; last good checkpoint: "
                                       f"{ckpt.newest_checkpoint(out_dir) or 'none'}. Try a lower --lr")
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))  # 0: off
                    in_update = True    # a second Ctrl-C in here leaves half-updated weights: not saved
                    opt.step()
                    in_update = False
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    rng_boundary = ckpt.rng_state()
                    if step_callback is not None:
                        step_callback(j, step, model)

                    # ---- log, save, stop ------------------------------------------------------------
                    dt = max(time.time() - t0, 1e-9)
                    tok_log += n_seen
                    bar.update(1)
                    bar.set_postfix(loss=f"{total_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{n_seen / dt:.0f}")
                    if log_now:
                        log.step(where, step, total, total_loss, logged, alpha, lr, float(gnorm),
                                 tok_log / max(time.time() - t_log, 1e-9), dt, task=j + 1, shares=shares)
                        term_log.append({"step": step, "terms": logged, "grad_share": shares or {}})
                        t_log, tok_log = time.time(), 0
                    if cfg["save_every"] and step % cfg["save_every"] == 0 and step < total:
                        save_last(step)
                    # every rank stops at the same step, or DDP's collectives would hang
                    if all_reduce_sum(torch.tensor([float(stop.requested)], device=d.device), d).item() > 0:
                        raise KeyboardInterrupt
            # ---- end of the task: evaluate (before merging: a Ctrl-C here saves the trained task,
            # step = total, with its adapters as they are, and --resume goes straight to this evaluation)
            bar.close()
            if cfg["eval_n"] > 0:
                evaluating = True
                evaluate_and_record(f"stage {j + 1} (after {task.name})")
        except KeyboardInterrupt:
            bar.close()  # before any message, so that it starts on a line of its own
            if in_update:
                log.line("interrupted inside an optimizer update: nothing saved, the last checkpoint is kept")
                raise
            save_last(step)
            log.line(f"interrupted {'while evaluating' if evaluating else 'at'} task {j + 1} step {step}/"
                     f"{total}: saved {out_dir / 'last'}; rerun the same command with --resume to continue")
            raise
        finally:
            bar.close()

        # ---- merge, checkpoint -------------------------------------------------------------------
        if cfg["lora_r"] > 0 and cfg["lora_merge"]:
            lora.merge(model)
        results["training"].append(term_means(task.name, term_log))
        path = ckpt.save_stage(run, model, tok, j + 1, results["stages"], [t.name for t in train_tasks], d,
                               training=results["training"])
        if d.main:
            write_json(out_dir / "results.json", results)
            log.line(f"{where} done: saved {path}")
        barrier(d)
        model.train()

    if d.main:
        write_json(out_dir / "results.json", results)
        log.final(results, out_dir)     # metrics, a summary in plain words, summary.png
    barrier(d)
    return results


def main(argv=None, step_callback=None) -> dict:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: train(resolve_config(args), step_callback=step_callback))


if __name__ == "__main__":
    main()
