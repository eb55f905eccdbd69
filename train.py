"""
Continual instruction tuning, plain or guided by instruction vectors (IVs).

Tasks T_1..T_n are fine-tuned one after another; after each, every training task and a general-ability
suite are evaluated, and the continual-learning metrics of docs/method.md §5 go to out_dir/results.json.

IV-guided training (docs/method.md §4; Jiang et al., arXiv 2406.12227), per task T_j with the
instruction vector θ_j extracted from the model *before any training*:
  1. progressive intervention: α_t·θ_j is added to the residual stream after block ℓ at each row's
     last prompt token, α_t falling linearly from α_0 to 0 over the task's steps (inference: no IV);
  2. L = CE(answer tokens) + λ·KL(P_θ ‖ P_ref+IV) at temperature τ, P_ref+IV = the frozen reference
     (the original, or the previous stage's model) with θ_j added after block ℓ.
Baselines and the sibling code's loss are presets (--preset, the PRESETS table beside the flags).

    python train.py --guided --quick    # a few minutes; drop --guided for plain fine-tuning
    python train.py --preset fvg --regime lora   # the sibling code's loss in its LoRA regime
    python train.py --guided --resume   # continue an interrupted run in the same out_dir
    torchrun --nproc_per_node 4 train.py --guided --model path/to/hf_dir   # DDP (add --fsdp to shard)

Reads top to bottom: flags → the method (schedules, IV intervention, the loss) → the run: data, model,
IVs, reference → for each task: for each step: micro-batches → loss → backward → clip → update
→ log; evaluate → save. The rest (loading, data, checkpoints, evaluation) is one call into `ivft`.
Shapes: B rows, T tokens, C d_model, V vocab, N answer tokens in a batch (legend of model.py).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import evaluate
import extract_iv
from ivft import checkpoint as ckpt
from ivft import chat, lora, memplan
from ivft.config import HelpFormatter, add_run_flags, check_flags, check_launch, lora_spec
from ivft.data import (collate, encode_task, load_task_list, other_prompts, other_tasks, stage_pool, step_counts, step_micro_batches,
                       steps_for)
from ivft.dist import (all_reduce_floats, all_reduce_sum, barrier, grad_shares, no_sync,
                       setup_distributed, wrap_for_parallel)
from ivft.engine import autocast, lm_head_fp32, resolve_amp
from ivft.files import RunLock
from ivft.interrupt import TaskGuard, deferred_stop
from ivft.ivfile import model_tag, union_of_top_heads
from ivft.optim import make_adamw
from ivft.reference import Reference, needs_original_copy, pick_reference
from ivft.report import term_means
from ivft.errors import Diverged, TrainError
from ivft.runtime import Logger, code_version, run_cli, write_json
from ivft.tasks import default_sequence
from model import Intervention, Transformer

# ---------------------------------------------------------------------------------------------
# Flags, grouped as in nanochat, each with its default where it is set. A preset (--preset /
# --guided, --regime, --quick) changes some defaults (PRESETS below, applied by parse_flags with
# parser.set_defaults): a flag given on the command line always wins, then the regime, then the
# method, then --quick. `python train.py --guided --help` shows the defaults --guided runs with.

LORA_LR = 3e-4     # the lr of any LoRA run (--lora_r > 0) that does not set --lr (results/lora_pilot.json)
PRESETS = {
    "method": {
        "plain": {},
        "replay": {"replay": 0.25},                                     # + a quarter from earlier tasks
        "lwf": {"kl_weight": 1.0, "kl_iv": False},                      # KL to the frozen original, no IV
        "iv_only": {"iv_alpha0": 1.0},                                  # progressive intervention, no KL
        "guided": {"iv_alpha0": 1.0, "kl_weight": 1.0, "kl_iv": True},  # both: --guided
        # the FvForgetting code's loss: no vector in the trained model; KL(P_θ ‖ P_prev+IV) at τ 2 at the
        # last prompt token (weight 20) and over all positions (weight 0.1), each counted only when its
        # batch mean is above 0.1; per-head MSE of the top heads' z vs the previous model's (weight 1,
        # each head counted only above 0.01); the reference is the previous stage's model
        "fvg": {"iv_alpha0": 0.0, "kl_weight": 20.0, "kl_iv": True, "kl_temp": 2.0, "kl_positions": "last",
                "kl_min": 0.1, "kl_gate": "batch", "kl_all_weight": 0.1, "head_mse_weight": 1.0,
                "head_mse_min": 0.01, "kl_ref": "previous"},
    },
    # full = full fine-tuning; lora = the sibling code's family: r 8, α 16, dropout 0.1 on q_proj/v_proj,
    # a fresh adapter merged after every task, constant lr; lr and epochs chosen on a dev split by
    # experiments/lora_pilot.py (16 epochs: the most the study's protocol tries)
    "regime": {
        "full": {},
        "lora": {"lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.1, "lora_targets": "q_proj,v_proj",
                 "lora_merge": True, "lr_schedule": "constant", "warmup": 0.0, "lr": LORA_LR, "epochs": 16.0},
    },
    # --quick: a miniature of the default budget (4 tasks x 40 steps of 8, 5 stage evaluations, IVs from
    # 50 clean / 25 corrupted prompts): 2 tasks the model learns in 24 steps, 3 evaluations of 10 examples
    "quick": {"tasks": "date_iso,reverse_words", "max_train": 192, "max_steps": 24, "eval_n": 10,
              "iv_n_clean": 12, "iv_n_corrupt": 4, "iv_dir": os.path.join("ivs", "quick")},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("presets").add_argument
    g("--preset", default="plain", choices=list(PRESETS["method"]), help="the method: plain, replay, lwf (KL "
      "to the original, no IV), iv_only, guided, fvg (the FvForgetting code's loss)")
    g("--guided", action="store_true", help="--preset guided: progressive IV + KL to the reference + IV")
    g("--regime", default="full", choices=list(PRESETS["regime"]),
      help="full fine-tuning, or lora: the sibling code's LoRA (merged after every task, constant lr)")
    g("--quick", action="store_true", help="a run of a few minutes: few examples and steps per task")

    g = p.add_argument_group("data").add_argument
    g("--tasks", default=None, help="comma-separated training sequence: registry names or task files in any "
      "format tasks.load_task reads (default: tasks.default_sequence())")
    g("--general", default=None, help="comma-separated general suite, or 'none' (default: the suite's)")
    g("--max_train", type=int, default=320, help="at most this many training examples per task")
    g("--chat_template", default=None, metavar="FILE", help=chat.FLAG_HELP)
    g("--max_len", type=int, default=256, help="longest training sequence; longer prompts lose their start")
    g("--replay", type=float, default=0.0, help="add FRACTION x (task size) examples of the earlier tasks")

    g = p.add_argument_group("optimisation").add_argument
    g("--epochs", type=float, default=1.0, help="epochs per task, fractions allowed")
    g("--max_steps", type=int, default=0, help="optimizer steps per task, 0 = from --epochs")
    g("--batch_size", type=int, default=8, help="examples per optimizer step, all ranks together")
    g("--micro_batch", type=int, default=None, help="examples per forward pass per rank (default: the "
      "largest divisor <= 8 of the batch per rank); batch_size / (micro_batch x ranks) = accumulation steps")
    g("--lr", type=float, default=1e-4, help=f"peak learning rate ({LORA_LR} whenever --lora_r > 0)")
    g("--lr_schedule", default="cosine", choices=["cosine", "linear", "constant"],
      help="decay after warmup, restarted for every task")
    g("--min_lr_ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    g("--warmup", type=float, default=0.1, help="warmup: a fraction of the task's steps if < 1, else steps")
    g("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g("--betas", default="0.9,0.999", help="AdamW betas")
    g("--grad_clip", type=float, default=1.0, help="clip the gradient norm; 0 = off")
    g("--seed", type=int, default=0, help="seed of data order, replay sampling and LoRA init")

    add_guidance_flags(p)     # the loss's terms and their weights: below

    g = p.add_argument_group("instruction vectors (extracted and cached by extract_iv.py)").add_argument
    g("--iv_layer", type=int, default=None, help="add the IVs after this block (0-based); default: each IV's "
      "own (extract_iv.py's); any layer reuses the cached IV")
    g("--iv_dir", default="ivs", help="IV cache: <iv_dir>/<model tag>/<task>.safetensors (<name>-<data "
      "hash> for a task file), the layout extract_iv.py writes")
    g("--iv_method", default="exact", choices=["exact", "attribution"], help="AIE computation")
    g("--iv_n_clean", type=int, default=50, help="clean prompts averaged into the heads' mean z")
    g("--iv_n_corrupt", type=int, default=25, help="corrupted prompts averaged into the AIE")
    g("--iv_top_k", type=int, default=None, help="heads in the IV (default: extract_iv.py's)")
    g("--iv_file", action="append", default=[], metavar="TASK=PATH",
      help="use this IV file for TASK instead of extracting one (repeatable)")

    evaluate.add_stage_flags(p)    # --eval_n, --eval_k_shot, ...: how each stage is evaluated
    add_run_flags(p)     # the model and LoRA, I/O (out_dir, resume, log), system (device, dtype, DDP/FSDP)
    for action in p._actions:     # what each preset sets, from PRESETS itself (so the help cannot drift)
        if note := preset_note(action.dest):
            action.help += f" (presets: {note})"
    return p


def add_guidance_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("guidance (docs/method.md §4)").add_argument
    g("--iv_alpha0", type=float, default=0.0, help="starting scale α_0 of the IV in the trained model")
    g("--iv_norm_ratio", type=float, default=0.0, help="rescale each IV to this fraction of the mean hidden-"
      "state norm at its layer on its training prompts, in model and reference alike (0: as extracted)")
    g("--kl_weight", type=float, default=0.0, help="λ of the KL term; without an IV: the lwf baseline")
    g("--kl_iv", action=argparse.BooleanOptionalAction, default=False,
      help="add the IV to the KL reference; --no-kl_iv: the reference without the IV (ablation)")
    g("--alpha_schedule", default="linear", choices=["linear", "constant"],
      help="α_t over a task's steps: linear from α_0 to 0, or constant α_0 (ablation)")
    g("--kl_temp", type=float, default=2.0, help="softmax temperature τ of both KL sides")
    g("--kl_positions", default="last", choices=["last", "answer", "all"],
      help="KL at the last prompt token, at every answer position, or at every real position")
    g("--kl_ref", default="original", choices=["original", "previous"],
      help="the frozen reference: the model before any training, or after the previous task")
    g("--kl_min", type=float, default=0.0, help="count a KL only when above this (0 = always)")
    g("--kl_gate", default="row", choices=["row", "batch"],
      help="--kl_min applies to each row's KL, or to the micro-batch mean as in the sibling code")
    g("--kl_all_weight", type=float, default=0.0,
      help="weight of a second KL over every real position, prompt and answer (0 = off)")
    g("--head_mse_weight", type=float, default=0.0, help="weight of the sibling paper's MSE between the top "
      "heads' z and the reference's (without the IV), summed over heads (0 = off)")
    g("--head_mse_min", type=float, default=0.0, help="count a head's MSE only when above this")
    g("--free_kl_weight", type=float, default=0.0, help="weight of KL(P_θ ‖ P_ref) at the last token of "
      "the batch's prompts without the instruction (beyond the paper: where it is absent, behave as before)")
    g("--other_kl_weight", type=float, default=0.0, help="weight of KL(P_θ ‖ P_ref) at the last token of "
      "prompts that carry *other* instructions, one per row from --other_kl_tasks (beyond the paper: where "
      "another instruction is given, follow it as before)")
    g("--other_kl_tasks", default="category,sentiment,spell,name_swap,time_12h", help="tasks whose training "
      "prompts --other_kl_weight reads (comma-separated names or files): the registry's tasks that are "
      "neither trained nor evaluated; one that is also a training or general task is refused")


def preset_note(dest: str) -> str:
    """'guided 1.0, fvg 20.0; --regime lora 8; --quick 24' for a flag the presets set, else ''."""
    parts = [", ".join(f"{m} {v[dest]}" for m, v in PRESETS["method"].items() if dest in v)]
    parts += [f"--regime {r} {v[dest]}" for r, v in PRESETS["regime"].items() if dest in v]
    parts += [f"--quick {PRESETS['quick'][dest]}"] if dest in PRESETS["quick"] else []
    return "; ".join(p for p in parts if p)


def parse_flags(argv=None) -> dict:
    """The flags as a dict: the presets' defaults set on the parser first (so --help shows them), then
    the command line, then every value checked (ivft.config.check_flags: one line naming the flag)."""
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # which presets (--preset/--guided, --regime, --quick, --lora_r); --help waits for their defaults
    first, _ = p.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    if first.guided and first.preset not in ("plain", "guided"):
        raise TrainError(f"--guided is --preset guided: it cannot be combined with --preset {first.preset}")
    method = "guided" if first.guided else first.preset
    regime = PRESETS["regime"][first.regime]
    name = method + ("-lora" if first.regime == "lora" else "") + ("-quick" if first.quick else "")
    p.set_defaults(**(PRESETS["quick"] if first.quick else {}), **PRESETS["method"][method],
                   **{k: v for k, v in regime.items()}, preset=method, guided=method == "guided",
                   out_dir=os.path.join("runs", name))
    if (first.lora_r or 0) > 0 and "lr" not in regime:   # LoRA wants a larger lr than full fine-tuning
        p.set_defaults(lr=LORA_LR)
    cfg = check_flags(vars(p.parse_args(argv)))
    if cfg["compile"] and Guidance.from_flags(cfg).uses_iv():
        raise TrainError("--compile is for the plain path; drop it with IV guidance")
    return cfg


# ---------------------------------------------------------------------------------------------
# The method: α schedule, lr schedule, the IV intervention, the loss (docs/method.md §4)

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


REF = {"needs": "reference"}     # a term's weight field that carries this compares with the frozen reference


@dataclass
class Guidance:
    """What the loss needs beyond the batch; the fields named like flags come from them (from_flags).
    The method's decisions are read off these fields (needs_reference, uses_iv): a term's weight
    declared with metadata=REF makes the run create the frozen reference for it."""
    ivs: torch.Tensor | None = None        # (n_tasks, C) the IV of every training task
    layers: torch.Tensor | None = None     # (n_tasks,) injection layer per task
    alpha: float = 0.0                     # α_t of the current step
    train_iv: bool = False                 # add α·IV in the trained model
    kl_iv: bool = False                    # add 1·IV in the reference
    kl_weight: float = field(default=0.0, metadata=REF)
    kl_temp: float = 2.0
    kl_positions: str = "last"
    kl_min: float = 0.0                    # a KL counts only above this: each row's, or the batch mean's
    kl_gate: str = "row"
    kl_all_weight: float = field(default=0.0, metadata=REF)      # a second KL over every real position
    head_mse_weight: float = field(default=0.0, metadata=REF)    # the sibling paper's MSE of the top heads' z
    head_mse_min: float = 0.0              # a head's MSE counts only above this
    heads: dict | None = None              # {layer: LongTensor of head indices} for the MSE term
    free_kl_weight: float = field(default=0.0, metadata=REF)     # the KL on prompts without the instruction
    other_kl_weight: float = field(default=0.0, metadata=REF)    # the KL on prompts with other instructions

    @classmethod
    def from_flags(cls, cfg: dict, **given):
        flags = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg and f.name not in given}
        given.setdefault("train_iv", cfg["guided"] or cfg["iv_alpha0"] > 0)    # the IV in the trained model
        return cls(**flags, **given)

    def needs_reference(self) -> bool:
        return any(getattr(self, f.name) > 0 for f in fields(self) if f.metadata.get("needs") == "reference")

    def uses_iv(self) -> bool:
        """The trained model gets the (possibly zero-scaled) IV, or the reference does."""
        return self.train_iv or (self.needs_reference() and self.kl_iv)


def add_iv(g: Guidance, batch: dict, scale, record_z=()) -> Intervention:
    """The IV of each row's task, at that row's last prompt token, after that task's layer."""
    rows_iv = g.ivs[batch["task"]]                                        # (B, C)
    row_layer = g.layers[batch["task"]]                                   # (B,)
    add = {}
    for layer in row_layer.unique().tolist():
        # rows of tasks injected at another layer get a zero vector here
        add[layer] = rows_iv * (row_layer == layer).to(rows_iv.dtype)[:, None]
    return Intervention(pos=batch["last"], add_resid=add, scale=scale, record_z=record_z)


class LossModule(nn.Module):
    """forward(batch, norms) -> (weighted total to backpropagate, {term: weighted value, detached}): one
    module around the model, so that DDP/FSDP see one forward; the log, the divergence check and the
    reports iterate over the terms that come back. norms = (answer tokens, rows, real tokens) of the whole
    step over all ranks: each micro-batch's sums are divided by them, so gradient accumulation and any
    number of DDP ranks give one big batch's gradient (DDP averages over ranks, hence `world`)."""

    def __init__(self, model: Transformer, world: int = 1, guidance: Guidance | None = None,
                 reference: Reference | None = None, amp_dtype=None):
        super().__init__()
        self.model, self.world, self.guidance = model, world, guidance or Guidance()
        # the frozen reference (ivft/reference.py): a model of its own, or the trained one seen with some
        # LoRA adapters off; a plain object, so DDP, state_dict and .parameters() never see it. None unless
        # a term declared it needs one (Guidance, metadata=REF)
        self.reference = reference
        self.amp_dtype = amp_dtype      # --dtype: bf16 autocast around the forward, or None (fp32)

    def forward(self, batch, norms, keep_graph: bool = False):
        with autocast(self.amp_dtype, batch["idx"].device.type):
            return self.loss(batch, norms, keep_graph)

    def loss(self, batch, norms, keep_graph: bool = False):
        g, model = self.guidance, self.model
        n_tok, n_rows = norms[0], norms[1]
        # The paper's loss: L = CE(answer tokens) + λ·KL(P_θ ‖ P_ref+IV), α_t·IV in the trained model
        record = tuple(g.heads) if g.head_mse_weight > 0 else ()           # the sibling's MSE reads heads' z
        edit = add_iv(g, batch, g.alpha, record) if g.train_iv else \
            (Intervention(pos=batch["last"], record_z=record) if record else None)
        h = model(batch["idx"], pad_mask=batch["pad_mask"], intervention=edit, return_hidden=True)   # (B,T,C)
        sel = batch["targets"] != -100                                      # (B, T) answer positions
        # the LM head runs only where something is scored, in fp32 (ivft/engine.py says why)
        logits = lm_head_fp32(model, h[sel])                                 # (N, V): no logits elsewhere
        parts = {"ce": F.cross_entropy(logits, batch["targets"][sel], reduction="sum") / n_tok}
        # the frozen reference's hidden states (+IV) and heads' z: one pass for the terms that read them
        ref_h, ref_z = self.reference_pass(batch) if g.kl_weight or g.kl_all_weight or record else (None, {})
        if g.kl_weight > 0:
            parts["kl"] = g.kl_weight * self.kl_term(batch, h, logits, ref_h, norms)
        # beyond the paper, and the sibling code's terms: named functions below
        if g.free_kl_weight > 0:
            parts["free_kl"] = g.free_kl_weight * self.prompt_kl(batch, "free", n_rows)
        if g.other_kl_weight > 0:
            parts["other_kl"] = g.other_kl_weight * self.prompt_kl(batch, "other", n_rows)
        if g.kl_all_weight > 0:
            parts["kl_all"] = g.kl_all_weight * self.kl_all_positions(batch, h, ref_h, n_rows)
        if g.head_mse_weight > 0:
            parts["mse"] = g.head_mse_weight * self.head_mse(edit.z, ref_z, n_rows)
        loss = sum(parts.values())
        return loss * self.world, parts if keep_graph else {k: v.detach() for k, v in parts.items()}

    @contextlib.contextmanager
    def frozen(self):
        """The frozen reference, run without gradients: with loss.frozen() as ref: ref(idx, ...)."""
        if self.reference is None:   # never the trained model in its place: that would compare it with itself
            raise TrainError("a loss term compares with the frozen reference, but the run created none: "
                             "declare its weight in train.py's Guidance with metadata=REF")
        with torch.no_grad(), self.reference() as ref:
            yield ref

    def ref_head(self, h):
        """The reference's logits (N, V) from its hidden states (N, C): its own fp32 LM head."""
        return lm_head_fp32(self.reference.model, h)

    def kl_term(self, batch, h, logits, ref_h, norms):
        """The paper's KL at --kl_positions: the last prompt token (which predicts the first answer
        token), every answer position, or every real position; gated by --kl_min."""
        g, B = self.guidance, len(batch["idx"])
        if g.kl_positions == "last":
            at = torch.arange(B, device=h.device), batch["last"]
            kl = kl_per_row(lm_head_fp32(self.model, h[at]), self.ref_head(ref_h[at]), g.kl_temp)      # (B,)
            return gate(kl, g.kl_min, g.kl_gate, B) / norms[1]
        if g.kl_positions == "answer":
            sel = batch["targets"] != -100
            kl = kl_per_row(logits, self.ref_head(ref_h[sel]), g.kl_temp)                            # (N,)
            return gate(kl, g.kl_min, g.kl_gate, B) / norms[0]
        real = real_positions(batch)
        kl = kl_per_row(lm_head_fp32(self.model, h[real]), self.ref_head(ref_h[real]), g.kl_temp)
        return gate(kl, g.kl_min, g.kl_gate, B) / norms[2]

    @torch.no_grad()
    def reference_pass(self, batch) -> tuple[torch.Tensor, dict]:
        """-> (hidden states (B, T, C) of the reference (+IV), its top heads' z without the IV)."""
        g = self.guidance
        record = tuple(g.heads) if g.head_mse_weight > 0 else ()
        idx, pad_mask = batch["idx"], batch["pad_mask"]
        if g.kl_positions == "last" and g.kl_all_weight == 0:
            # causal attention: nothing after the last prompt token matters there (for the KL and for
            # the heads' z), so the reference reads only the prompt part of the batch
            T = int(batch["last"].max()) + 1
            idx, pad_mask = idx[:, :T], (pad_mask[:, :T] if pad_mask is not None else None)
        with self.frozen() as ref:
            edit = add_iv(g, batch, 1.0) if g.kl_iv else Intervention(pos=batch["last"], record_z=record)
            h = ref(idx, pad_mask=pad_mask, intervention=edit, return_hidden=True)       # (B, T, C)
            z = edit.z
            if record and g.kl_iv:   # the heads' z are compared with the reference's own, without the IV
                z = Intervention(pos=batch["last"], record_z=record)
                ref(idx, pad_mask=pad_mask, intervention=z)
                z = z.z
        return h, z

    def prompt_kl(self, batch, key, n_rows):
        """Beyond the paper: KL(P_θ ‖ P_ref) at the last token of other prompts than the batch's, the
        reference without the IV. key "free": the same rows' prompts without the task's instruction (the
        input alone); "other": one prompt per row carrying another task's instruction (--other_kl_tasks).
        The KL on the task's own prompts cannot see the new format leaking into prompts where its
        instruction is absent, or where another one is given; these do."""
        at = torch.arange(len(batch["idx"]), device=batch["idx"].device), batch[f"{key}_last"]
        h = self.model(batch[key], pad_mask=batch[f"{key}_mask"], return_hidden=True)[at]         # (B, C)
        with self.frozen() as ref:
            ref_h = ref(batch[key], pad_mask=batch[f"{key}_mask"], return_hidden=True)[at]
        kl = kl_per_row(lm_head_fp32(self.model, h), self.ref_head(ref_h), self.guidance.kl_temp)
        return kl.sum() / n_rows

    def kl_all_positions(self, batch, h, ref_h, n_rows):
        """The FvForgetting code's second KL (--kl_all_weight): every real position, summed per row,
        gated like the KL."""
        g, B = self.guidance, len(batch["idx"])
        real = real_positions(batch)
        kl_pos = kl_per_row(lm_head_fp32(self.model, h[real]), self.ref_head(ref_h[real]), g.kl_temp)  # (n)
        per_row = torch.zeros(B, device=kl_pos.device).index_add(0, real.nonzero()[:, 0], kl_pos)
        return gate(per_row, g.kl_min, g.kl_gate, B) / n_rows

    def head_mse(self, z, ref_z, n_rows):
        """The FvForgetting code's MSE between the top heads' z and the reference's (without the IV),
        at the last prompt token; each head counted only above --head_mse_min."""
        g, mse = self.guidance, 0.0
        for layer, heads in g.heads.items():
            # z: (B, 1, H, D) at the last prompt token -> the top heads; per head the mean over D
            diff = z[layer][:, 0, heads].float() - ref_z[layer][:, 0, heads].float()       # (B, k, D)
            per_head = diff.pow(2).mean(-1)                                                 # (B, k)
            mse = mse + sum(gate(per_head[:, i], g.head_mse_min, "batch", len(diff))
                            for i in range(len(heads)))
        return mse / n_rows


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


# ---------------------------------------------------------------------------------------------
# The run

def train(cfg: dict, step_callback=None) -> dict:
    """Run (or resume) the whole sequence. `step_callback(stage, step, model)` is called after every
    optimizer step (tests use it to interrupt or poison a run). Returns the results dict."""
    torch.set_num_threads(cfg["num_threads"] or torch.get_num_threads())
    d = setup_distributed(cfg["device"])
    check_launch(cfg, d.world)        # before the lock, which creates out_dir: is it writable at all?
    if cfg["dry_run"] is not None:   # config.json only: the memory plan, then exit (refused if too big)
        memory = cfg["dry_run"] * 2 ** 30 if cfg["dry_run"] else memplan.device_memory(d.device)
        print(memplan.dry_run(cfg["model"], memory_shape(cfg, d), int(memory)))
        return {}
    # one writer per run folder: rank 0 holds out_dir/run.lock while it runs (a second train.py, or a
    # study driver's orphan, is refused in one line); released and removed when train() ends
    with RunLock(cfg["out_dir"], what=f"--out_dir {cfg['out_dir']}") if d.main else contextlib.nullcontext():
        # the git commit (+ a hash of uncommitted changes) it runs on: train_config.json, results.json
        return run_sequence({**cfg, "code": code_version()}, d, step_callback)


def memory_shape(cfg: dict, d) -> memplan.RunShape:
    """What the memory plan (--dry_run) needs of the flags."""
    n_tasks = len(cfg["tasks"].split(",")) if cfg["tasks"] else len(default_sequence())
    guidance = Guidance.from_flags(cfg)
    return memplan.RunShape(
        lora_r=cfg["lora_r"], lora_targets=tuple(cfg["lora_targets"].split(",")),
        lora_dropout=cfg["lora_dropout"],
        n_tasks=n_tasks if cfg["lora_merge"] else 1, model_dtype=cfg["model_dtype"],
        amp="bf16" if resolve_amp(cfg["dtype"], d.device) else None, micro_batch=cfg["micro_batch"],
        max_len=cfg["max_len"], reference=guidance.needs_reference(), grad_checkpointing=cfg["grad_checkpointing"],
        fsdp_ranks=d.world if cfg["fsdp"] else 1, ddp=d.world > 1 and not cfg["fsdp"])


def run_sequence(cfg: dict, d, step_callback) -> dict:
    out_dir = Path(cfg["out_dir"])

    # ---- data, model, IVs: everything is checked before anything is written ----------------------
    train_tasks = load_task_list(cfg["tasks"], "default_sequence", "training")
    general = load_task_list(cfg["general"], "general_suite", "general")
    others = other_tasks(cfg["other_kl_tasks"], train_tasks + general) if cfg["other_kl_weight"] > 0 else []
    guidance = Guidance.from_flags(cfg)
    ckpt.check_before_load(cfg["model"], cfg["max_len"], train_tasks, general,   # from config.json alone
                           cfg["iv_dir"] if guidance.uses_iv() else None)
    amp_dtype = resolve_amp(cfg["dtype"], d.device)
    spec = lora_spec(cfg)             # None: full fine-tuning
    run = ckpt.RunFiles(out_dir, cfg, cfg["model"], cfg["fsdp"], spec, finish_marker=True)
    evaluate.read_stage_cache(cfg["stage0_cache"])       # a bad file fails now, not after stage 0
    start = ckpt.find_resume(run, len(train_tasks), cfg["resume"], cfg["overwrite"], d.main, d)
    if start["finished"] is not None:
        return start["finished"]
    model, tok = ckpt.load_base_model(cfg["model"], cfg["model_dtype"], d.device, spec and spec.targets,
                                      cfg["chat_template"])
    model.grad_checkpointing = cfg["grad_checkpointing"]     # recompute each block in the backward
    ckpt.check_after_load(run, model, tok, cfg["max_len"], train_tasks, general, start["ckpt"],
                          cfg["accept_changed_inputs"])
    other = other_prompts(tok, others, cfg["max_len"]) if others else None
    encoded = [encode_task(tok, t, i, cfg["max_len"], cfg["max_train"], free=cfg["free_kl_weight"] > 0,
                           other=other, seed=cfg["seed"]) for i, t in enumerate(train_tasks)]
    # IVs come from the model before any training: extracted (or loaded) before a resumed run's weights
    ivs = add_ivs(cfg, guidance, model, tok, train_tasks, d.device) if guidance.uses_iv() else {}
    original = keep_original(guidance, model, cfg["kl_ref"], spec, len(train_tasks))

    # ---- resume: the weights, results and (below) RNG of the newest checkpoint, in one place --------
    state = start["state"]           # None: a fresh start
    start_stage, start_step = (state["stage_done"], state["step"]) if state is not None else (0, 0)
    results = evaluate.run_results(cfg, state, train_tasks, general)
    if state is not None:
        ckpt.restore_model(model, start["ckpt"], state, spec, out_dir)

    # ---- from here on we write --------------------------------------------------------------------
    ckpt.start_out_dir(run, clear=(cfg["overwrite"] and not cfg["resume"]) or start["early_death"], d=d)
    log = Logger(out_dir, d.main, cfg["wandb_project"] if cfg["wandb"] else None, cfg)
    if d.main:
        log.config(cfg, [f"IV {n}: layer {l}, norm {v.norm():.3f}" for n, (v, l, _) in ivs.items()])

    stage_eval = evaluate.StageEval(cfg["eval_n"], cfg["eval_k_shot"], cfg["eval_batch"], cfg["eval_metrics"])
    evaluate_and_record = functools.partial(evaluate_stage, model, tok, train_tasks, general, stage_eval,
                                            amp_dtype, results, out_dir, d, cfg["fsdp"])

    # the global RNG drives LoRA init and dropout: seeded once here, the same on every rank (FSDP
    # keeps each rank's shard of a freshly initialised adapter, so all ranks must draw the same
    # init); on resume it is what it was at the checkpoint (set again for a mid-task stage)
    if state is not None:
        log.line(f"resuming from {start['ckpt']}: {start_stage} task(s) done, step {start_step} of the next")
        ckpt.set_rng_state(state, d.rank)
    else:
        if cfg["eval_n"] > 0:
            evaluate_and_record("stage 0 (original model)", cache=cfg["stage0_cache"])
        torch.manual_seed(cfg["seed"])
        random.seed(cfg["seed"])

    loss_module = LossModule(model, d.world, guidance, amp_dtype=amp_dtype)
    for j, task in list(enumerate(train_tasks))[start_stage:]:
        loss_module.reference = start_task(j, model, guidance, original, cfg["kl_ref"], spec, out_dir)
        pool = stage_pool(encoded, j, cfg["replay"], cfg["seed"])      # + replayed examples of earlier tasks
        term_log = train_task(cfg, d, run, loss_module, tok, pool, j, f"task {j + 1}/{len(train_tasks)} {task.name}",
                              log, results, resume=state if j == start_stage and start_step else None,
                              step_callback=step_callback,
                              evaluate=lambda: evaluate_and_record(f"stage {j + 1} (after {task.name})"))
        save_task(cfg, d, run, model, tok, results, [t.name for t in train_tasks], j, term_log, log)

    if d.main:
        write_json(out_dir / "results.json", results)     # (a resume after the last stage writes it here)
        log.final(results, out_dir)     # metrics, a summary in plain words, summary.png
        ckpt.mark_finished(out_dir, [t.name for t in train_tasks])     # the last write: the run is final
    barrier(d)
    return results


def save_task(cfg: dict, d, run, model, tok, results: dict, names: list, j: int, term_log: list, log):
    """After task j: finish its adapters (merged into the saved weights with --lora_merge, kept apart
    in memory), record its loss terms, write the stage checkpoint and results.json. A Ctrl-C during
    the write stops the run right after it, with the task kept."""
    if cfg["lora_r"] > 0:
        lora.finish_task(model, merge=cfg["lora_merge"])
    results["training"].append(term_means(names[j], term_log))
    with deferred_stop():
        path = ckpt.save_stage(run, model, tok, j + 1, results["stages"], names, d, training=results["training"])
        if d.main:
            write_json(run.out_dir / "results.json", results)
            log.line(f"task {j + 1}/{len(names)} {names[j]} done: saved {path}")
        barrier(d)


def evaluate_stage(model, tok, train_tasks, general, stage_eval, amp_dtype, results: dict, out_dir: Path, d,
                   fsdp: bool, label: str, cache=None):
    """Evaluate every task after a stage (evaluate.py) on rank 0 (under FSDP on every rank: each forward
    gathers the shards), record it in results and out_dir/results.json."""
    report = evaluate.evaluate_stage(model, tok, train_tasks, general, stage_eval, label, amp_dtype,
                                     cache=cache, write_cache=d.main) if d.main or fsdp else None
    if d.main:
        evaluate.record_stage(results, report, train_tasks, general)
        write_json(out_dir / "results.json", results)
    barrier(d)


def keep_original(guidance: Guidance, model, kl_ref: str, spec, n_tasks: int):
    """A frozen copy of the original model, only where a term needs the reference (what the terms
    declared: Guidance.needs_reference) and LoRA's base with its adapters off cannot stand in."""
    keep = guidance.needs_reference() and needs_original_copy(spec)
    return ckpt.frozen_copy(model) if keep else None


def start_task(j: int, model, guidance: Guidance, original, kl_ref: str, spec, out_dir) -> Reference | None:
    """Task j's fresh LoRA adapters (none yet, or the last ones merged), and its frozen reference
    (--kl_ref), or None where no term declared it needs one."""
    if spec is not None and not lora.has_lora(model):
        lora.add_lora(model, spec.r, spec.alpha, spec.dropout, list(spec.targets))
    if not guidance.needs_reference():
        return None
    return pick_reference(j, model, original, kl_ref, spec, out_dir)


def add_ivs(cfg: dict, guidance: Guidance, model, tok, train_tasks, device) -> dict:
    """Every training task's IV (extract_iv.py's cache, or extracted now) -> {task: (iv, layer, meta)};
    puts them, their layers and (for the MSE term) their top heads into `guidance`."""
    ivs = extract_iv.training_ivs(
        model, tok, train_tasks, iv_dir=cfg["iv_dir"], model_id=model_tag(cfg["model"]),
        layer=cfg["iv_layer"], files=dict(f.split("=", 1) for f in cfg["iv_file"]), method=cfg["iv_method"],
        norm_ratio=cfg["iv_norm_ratio"], n_clean=cfg["iv_n_clean"], n_corrupt=cfg["iv_n_corrupt"],
        top_k=cfg["iv_top_k"])
    per_task = [ivs[t.name] for t in train_tasks]
    guidance.ivs = torch.stack([v for v, _, _ in per_task]).to(device)                 # (n_tasks, C)
    guidance.layers = torch.tensor([l for _, l, _ in per_task], device=device)        # (n_tasks,)
    guidance.heads = union_of_top_heads(ivs) if guidance.head_mse_weight > 0 else None  # {} raises there
    return ivs


def make_optimizer(cfg: dict, d, loss_module: LossModule, resume: dict | None):
    """-> (the module the steps call, the trainable parameters, a fresh AdamW over them). Resuming in
    this task: the saved optimizer state, and the RNG as it was at the checkpoint."""
    # wrapped first: FSDP replaces the parameters by sharded ones, which the optimizer must hold
    wrapped = wrap_for_parallel(loss_module, d, cfg["compile"], cfg["fsdp"])
    params = [p for p in loss_module.model.parameters() if p.requires_grad]
    betas = tuple(float(x) for x in cfg["betas"].split(","))
    # AdamW; over bf16 weights (--model_dtype bf16, full fine-tuning) with fp32 master weights and moments
    opt = make_adamw(params, lr=cfg["lr"], betas=betas, weight_decay=cfg["weight_decay"])
    if resume is not None:
        ckpt.load_optimizer(opt, resume, cfg["fsdp"], loss_module)
        ckpt.set_rng_state(resume, d.rank)
    return wrapped, params, opt


def train_task(cfg, d, run, loss_module, tok, pool, j, where, log, results, *, resume, step_callback,
               evaluate) -> list:
    """Task j: optimizer steps over its pool, then evaluate(). -> the loss's terms and gradient shares
    at the log steps. resume: the training state of a run interrupted in this task, else None."""
    model, guidance = loss_module.model, loss_module.guidance
    wrapped, params, opt = make_optimizer(cfg, d, loss_module, resume)
    # the loss's terms and gradient shares at log steps
    step, term_log = (0, []) if resume is None else (resume["step"], resume.get("term_log", []))
    total = steps_for(len(pool), cfg["batch_size"], cfg["epochs"], cfg["max_steps"])
    regularised = guidance.uses_iv() or guidance.needs_reference()     # log the other terms' gradient shares
    model.train()

    def save_last(at_step: int, rng: dict) -> Path:
        ckpt.save_mid_task(run, model, tok, opt, loss_module, j, at_step, rng, results["stages"], d,
                           training=results["training"], term_log=term_log)
        return run.out_dir / "last"

    with TaskGuard(save_last, log.line, f"task {j + 1}", total, step, ckpt.rng_state) as guard, \
            tqdm(total=total, initial=step, desc=where, disable=not d.main, dynamic_ncols=True) as bar:
        t_log, tok_log = time.time(), 0
        for step in range(step, total):
            # ---- one optimizer step: micro-batches -> loss -> backward -> clip -> update ----------
            t0 = time.time()
            micro = [collate(c, tok.pad_id, d.device) for c in step_micro_batches(
                pool, step, j, batch_size=cfg["batch_size"], micro_batch=cfg["micro_batch"], seed=cfg["seed"],
                rank=d.rank, world=d.world)]
            # normalisers of the whole step over all ranks (see LossModule), as a tensor, not floats:
            # torch.compile would specialise on every new value
            n_ans, n_rows, n_seen = all_reduce_sum(step_counts(micro, d.device), d).tolist()
            norms = torch.tensor([n_ans, n_rows, n_seen], device=d.device)
            guidance.alpha = alpha = alpha_at(step, total, cfg["iv_alpha0"], cfg["alpha_schedule"])
            lr = lr_at(step, total, cfg["lr"], cfg["lr_schedule"], cfg["warmup"], cfg["min_lr_ratio"])
            for group in opt.param_groups:
                group["lr"] = lr
            log_now = (step + 1) % cfg["log_every"] == 0 or step + 1 == total
            # each term's ‖∇term‖ / ‖∇ce‖ on the first micro-batch: does a regulariser act at all?
            shares = grad_shares(loss_module, micro[0], norms, params, loss_module.amp_dtype) \
                if log_now and regularised else None
            terms = {}
            for i, batch in enumerate(micro):
                with no_sync(wrapped, last=i == len(micro) - 1):   # DDP all-reduces in the last backward only
                    loss, parts = wrapped(batch, norms)
                    loss.backward()                             # gradients add up in .grad
                terms = {k: terms.get(k, 0.0) + v.float() for k, v in parts.items()}
            terms = all_reduce_floats(terms, d)          # {term: weighted value} over the step
            total_loss = sum(terms.values())
            if not math.isfinite(total_loss):
                last_good = ckpt.newest_checkpoint(run.out_dir) or "none"
                raise Diverged(f"loss is {total_loss} at {where} step {step + 1}/{total} (lr {lr:.2e}): "
                               f"stopped without saving; last good checkpoint: {last_good}. Try a lower --lr")
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))   # 0: off
            with guard.update():     # a second Ctrl-C in here leaves half-updated weights: not saved
                opt.step()
            opt.zero_grad(set_to_none=True)
            guard.step_done(step + 1)
            if step_callback is not None:
                step_callback(j, step + 1, model)

            # ---- log, save, stop ------------------------------------------------------------------
            dt = max(time.time() - t0, 1e-9)
            tok_log += n_seen
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{n_seen / dt:.0f}")
            if log_now:
                log.step(where, step + 1, total, total_loss, terms, alpha, lr, float(gnorm),
                         tok_log / max(time.time() - t_log, 1e-9), dt, task=j + 1, shares=shares)
                term_log.append({"step": step + 1, "terms": terms, "grad_share": shares or {}})
                t_log, tok_log = time.time(), 0
            if cfg["save_every"] and (step + 1) % cfg["save_every"] == 0 and step + 1 < total:
                save_last(step + 1, guard.rng)
            # every rank stops at the same step, or DDP's collectives would hang
            if all_reduce_sum(torch.tensor([float(guard.stop_requested)], device=d.device), d).item() > 0:
                raise KeyboardInterrupt
        # ---- end of the task: evaluate (before merging: a Ctrl-C here saves the trained task,
        # step = total, with its adapters as they are, and --resume goes straight to this evaluation)
        bar.close()
        if cfg["eval_n"] > 0:
            guard.evaluating()
            evaluate()
    return term_log


def main(argv=None, step_callback=None) -> dict:
    return run_cli(lambda: train(parse_flags(argv), step_callback=step_callback))


if __name__ == "__main__":
    main()
