"""
Continual instruction tuning, plain or guided by instruction vectors (IVs).

Tasks T_1..T_n are fine-tuned one after another; after every task the model is evaluated on every
training task and on a general-ability suite, and the continual-learning metrics of docs/method.md §5
(AP, BWT, FWT, GP/IP drop) are written to out_dir/results.json.

IV-guided training (docs/method.md §4; the IV paper is Jiang et al., arXiv 2406.12227, the sibling code
GangweiJiang/FvForgetting), per training task T_j with instruction vector θ_j extracted from the
model *before any training*:
  1. progressive intervention: α_t·θ_j is added to the residual stream after layer ℓ at the last
     prompt token (per row) of the model being trained, α_t falling linearly from α_0 to 0 over the
     task's optimizer steps, so the last steps (and inference) run without the IV;
  2. L = CE(answer tokens) + λ·KL(P_θ ‖ P_ref+IV) at temperature τ, where P_ref+IV is the frozen
     reference model (the original, or the previous stage's) with θ_j added at ℓ.
Baselines: plain sequential fine-tuning, replay of earlier tasks, a KL-to-the-original regulariser
without any IV. Ablations: KL without the IV, IV without KL, constant α, the sibling paper's MSE on
the top heads' outputs.

Usage:
    python train.py                     # plain sequential fine-tuning of the embedded SmolLM2-135M
    python train.py --guided            # the same with IV guidance
    python train.py --quick             # a few minutes: fewer examples, one short epoch
    python train.py --guided --resume   # continue an interrupted run in the same out_dir
    torchrun --nproc_per_node 4 train.py --guided --model path/to/hf_dir   # DDP (add --fsdp to shard)

Outputs in --out_dir: train_config.json (the resolved flags), log.txt (one line per --log_every steps),
results.json ({config, stages: one evaluate.py report per stage, stage 0 = the original model,
metrics: AP, BWT, FWT, GP_drop, IP_drop, cl: the full summary incl. the score matrix R}), stage-j/
(the model after task j) and last/ (a mid-task checkpoint: --save_every, Ctrl-C). Checkpoints are HF
directories that transformers opens as they are (LoRA adapters merged in; also stored apart in PEFT
layout), plus train_state.pt (optimizer, step, RNG, results so far) and train_config.json.

Everything the loop needs is in `train(cfg)`; `main(argv)` parses flags, calls it and turns our errors
into one-line messages (exit 2 for bad input, 3 for a diverged loss, 130 after Ctrl-C).

Shapes: B rows, T tokens, C d_model, V vocab, N answer tokens in a batch (legend of model.py).
"""
from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivft import lora
from ivft.load import LoadError, clean_leftovers, load_model, save_hf
from model import Intervention, Transformer


class TrainError(Exception):
    """Bad input or an unusable checkpoint: reported as one line, exit status 2."""
    exit_code = 2


class Diverged(TrainError):
    """The loss became NaN/inf: nothing is saved, the last good checkpoint is kept. Exit status 3."""
    exit_code = 3


# ---------------------------------------------------------------------------------------------
# Command line. Flags are grouped as in nanochat; `--guided` and `--quick` are presets that only
# change defaults, so every value they set can still be overridden.

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # "(default: None)" says nothing for flags whose default depends on --guided/--quick: their help
    # text spells the defaults out instead
    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("presets")
    g.add_argument("--guided", action="store_true",
                   help="IV-guided training: sets --iv_alpha0 1, --kl_weight 1, --kl_iv (docs/method.md §4)")
    g.add_argument("--quick", action="store_true",
                   help="a run of a few minutes: few training/eval examples, one short epoch per task")

    g = p.add_argument_group("I/O")
    g.add_argument("--out_dir", default=None, help="where checkpoints, log.txt and results.json go "
                   "(default runs/plain or runs/guided, with a -quick suffix under --quick)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir that holds a run")
    g.add_argument("--save_every", type=int, default=0,
                   help="also write a resumable checkpoint (out_dir/last) every N optimizer steps; 0 = only "
                        "after each task")
    g.add_argument("--log_every", type=int, default=10, help="log line every N optimizer steps")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (lazy import)")
    g.add_argument("--wandb_project", default="iv-guided-ft", help="wandb project name")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="HF directory or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--model_dtype", default="fp32", choices=["fp32", "bf16"],
                   help="storage dtype of the weights; bf16 only makes sense for a frozen LoRA base")
    g.add_argument("--lora_r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scale numerator (scale = alpha/r)")
    g.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input")
    g.add_argument("--lora_targets", default="q_proj,v_proj",
                   help=f"comma-separated linear layers to adapt ({','.join(lora.KNOWN_TARGETS)})")
    g.add_argument("--lora_merge", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the adapters into the weights after every task and start fresh ones "
                        "(as the sibling code does); --no-lora_merge keeps one adapter for all tasks")

    g = p.add_argument_group("data")
    g.add_argument("--tasks", default=None,
                   help="comma-separated training sequence: registry names or task files in any format "
                        "tasks.load_task reads (default: tasks.default_sequence())")
    g.add_argument("--general", default=None,
                   help="comma-separated general-ability suite, or 'none' (default: tasks.general_suite())")
    g.add_argument("--max_train", type=int, default=None, help="at most this many training examples per task (default 320; 24 under --quick)")
    g.add_argument("--max_len", type=int, default=256,
                   help="longest training sequence in tokens; longer prompts lose their start")
    g.add_argument("--replay", type=float, default=0.0,
                   help="mix in FRACTION x (task size) examples drawn from the earlier tasks")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=None, help="epochs per task, fractions allowed (default 1)")
    g.add_argument("--max_steps", type=int, default=0, help="optimizer steps per task; overrides --epochs")
    g.add_argument("--batch_size", type=int, default=None, help="examples per optimizer step, all ranks together (default 8)")
    g.add_argument("--micro_batch", type=int, default=None,
                   help="examples per forward pass per rank (default 8); batch_size / (micro_batch x ranks) = "
                        "gradient accumulation steps")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4 full, as in the sibling code; 3e-4 LoRA)")
    g.add_argument("--lr_schedule", default="cosine", choices=["cosine", "linear", "constant"],
                   help="decay after warmup, restarted for every task")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    g.add_argument("--warmup", type=float, default=0.1,
                   help="warmup length: a fraction of the task's steps if < 1, else a number of steps")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--betas", default="0.9,0.999", help="AdamW betas")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm; 0 = off")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, replay sampling and LoRA init")

    g = p.add_argument_group("guidance (docs/method.md §4; --guided sets the first three)")
    g.add_argument("--iv_alpha0", type=float, default=None,
                   help="starting scale α_0 of the IV added in the trained model (default 0; 1 with --guided)")
    g.add_argument("--kl_weight", type=float, default=None,
                   help="λ of the KL term (default 0; 1 with --guided); without --guided, the KL-to-reference "
                        "baseline")
    g.add_argument("--kl_iv", action=argparse.BooleanOptionalAction, default=None,
                   help="add the IV to the KL reference (default: with --guided); --no-kl_iv: the reference "
                        "without the IV (ablation)")
    g.add_argument("--alpha_schedule", default="linear", choices=["linear", "constant"],
                   help="α_t over a task's steps: linear from α_0 to 0, or constant α_0 (ablation)")
    g.add_argument("--kl_temp", type=float, default=2.0, help="softmax temperature τ of both KL sides")
    g.add_argument("--kl_positions", default="last", choices=["last", "answer"],
                   help="KL at the last prompt token, or at every answer position")
    g.add_argument("--kl_ref", default="original", choices=["original", "previous"],
                   help="the frozen reference: the model before any training, or after the previous task")
    g.add_argument("--kl_min", type=float, default=0.0,
                   help="count a row's KL only when above this (default 0 = always; the sibling code uses 0.1)")
    g.add_argument("--head_mse_weight", type=float, default=0.0,
                   help="weight of the sibling paper's MSE between the top heads' z and the reference's "
                        "(default 0 = off)")
    g.add_argument("--iv_layer", type=int, default=None,
                   help="inject after this block (0-based); default: the IV's own (extract_iv.py's default, "
                        "chosen on a dev split)")
    g.add_argument("--iv_dir", default=None, help="IV cache: <iv_dir>/<model tag>/<task>.safetensors "
                   "(<name>-<data hash> for a task file), "
                   "the layout extract_iv.py writes (default ivs, ivs/quick under --quick)")
    g.add_argument("--iv_method", default="exact", choices=["exact", "attribution"],
                   help="AIE computation of the IV extraction (extract_iv.py)")
    g.add_argument("--iv_n_clean", type=int, default=None, help="clean prompts averaged into the heads' mean z "
                   "(default 50, 12 under --quick)")
    g.add_argument("--iv_n_corrupt", type=int, default=None, help="corrupted prompts averaged into the AIE "
                   "(default 25, 4 under --quick)")
    g.add_argument("--iv_top_k", type=int, default=None, help="heads in the IV (default: extract_iv's)")
    g.add_argument("--iv_file", action="append", default=[], metavar="TASK=PATH",
                   help="use this IV file for TASK instead of extracting one (repeatable)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_n", type=int, default=None, help="test examples per task and stage (default 40; 5 under --quick); 0 = no evaluation")
    g.add_argument("--eval_k_shot", type=int, default=None,
                   help="demonstrations for the in-context (IP) score of the general suite (default 3)")
    g.add_argument("--eval_batch", type=int, default=128,
                   help="prompts per forward pass and rows per decoding step in evaluation (evaluate.py's "
                   "default; lower it for big models)")
    g.add_argument("--stage0_cache", default=None, metavar="PATH",
                   help="reuse the original model's evaluation from this JSON file when model, tasks and "
                   "evaluation flags match (written there otherwise): runs of one study share it")
    g.add_argument("--eval_metrics", default="needed", choices=["needed", "all"],
                   help="needed: each task's primary score (+ k-shot for the general suite) and the "
                        "instruction/knowledge log-probs; all: every metric of evaluate.py")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype for training and evaluation (auto = bf16 where the hardware "
                        "has native bf16 matmuls, else fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the plain (unguided) training step")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun")
    g.add_argument("--num_threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    return p


# defaults that depend on the presets: (plain, --guided) and (normal, --quick)
GUIDED_DEFAULTS = {"iv_alpha0": (0.0, 1.0), "kl_weight": (0.0, 1.0), "kl_iv": (False, True)}
# Budget of the defaults: 4 tasks x 40 steps of 8, 5 stage evaluations (~1 min each), the 4 IVs
# extracted once from 10-shot prompts (then cached). --quick: 4 x 3 steps, 5 evaluations of 5
# examples, IVs from 12 clean / 4 corrupted prompts. The README has the measured run times.
SIZE_DEFAULTS = {"max_train": (320, 24), "epochs": (1.0, 1.0), "batch_size": (8, 8),
                 "micro_batch": (8, 8), "eval_n": (40, 5), "eval_k_shot": (3, 3),
                 "iv_n_clean": (50, 12), "iv_n_corrupt": (25, 4), "iv_dir": ("ivs", os.path.join("ivs", "quick"))}
# flags that may differ between a run and its --resume (they do not change the numbers)
RESUME_FREE = {"resume", "overwrite", "save_every", "log_every", "wandb", "wandb_project", "num_threads",
               "stage0_cache", "out_dir"}   # out_dir: a moved or copied run resumes where it now is
# what a run writes before its first checkpoint: a folder holding only these was a start that died
# early (killed, or stopped by an error), and a rerun may start over in it
RUN_START_FILES = {"train_config.json", "log.txt", "results.json"}


def resolve_config(args: argparse.Namespace) -> dict:
    """Fill preset-dependent defaults and check values; no files are touched here."""
    cfg = dict(vars(args))
    for k, (plain, guided) in GUIDED_DEFAULTS.items():
        if cfg[k] is None:
            cfg[k] = guided if cfg["guided"] else plain
    for k, (normal, quick) in SIZE_DEFAULTS.items():
        if cfg[k] is None:
            cfg[k] = quick if cfg["quick"] else normal
    if cfg["lr"] is None:
        cfg["lr"] = 3e-4 if cfg["lora_r"] > 0 else 1e-4
    if cfg["out_dir"] is None:
        cfg["out_dir"] = os.path.join("runs", ("guided" if cfg["guided"] else "plain") + ("-quick" if cfg["quick"] else ""))
    if cfg["max_steps"] == 0 and cfg["quick"]:
        cfg["max_steps"] = 3
    checks = [
        (all(math.isfinite(v) for v in cfg.values() if isinstance(v, float)),
         "numeric flags must be finite: " + ", ".join(f"--{k} {v}" for k, v in cfg.items()
                                                      if isinstance(v, float) and not math.isfinite(v))),
        (cfg["batch_size"] > 0 and cfg["micro_batch"] > 0, "--batch_size and --micro_batch must be positive"),
        (cfg["max_len"] >= 8, "--max_len must be at least 8"),
        (cfg["lr"] > 0, "--lr must be positive"),
        (cfg["epochs"] > 0 or cfg["max_steps"] > 0, "--epochs or --max_steps must be positive"),
        (0 <= cfg["replay"] <= 10, "--replay must be a fraction in [0, 10]"),
        (cfg["kl_temp"] > 0, "--kl_temp must be positive"),
        (cfg["kl_weight"] >= 0 and cfg["head_mse_weight"] >= 0, "loss weights must be >= 0"),
        (cfg["lora_r"] >= 0, "--lora_r must be >= 0"),
        (0 <= cfg["lora_dropout"] < 1, "--lora_dropout must be in [0, 1)"),
        (cfg["model_dtype"] == "fp32" or cfg["lora_r"] > 0,
         "--model_dtype bf16 needs --lora_r > 0 (full fine-tuning keeps fp32 master weights)"),
        (not (cfg["compile"] and uses_iv(cfg)), "--compile is for the plain path; drop it with IV guidance"),
        (not (cfg["fsdp"] and cfg["lora_r"] > 0 and cfg["lora_merge"]),
         "--fsdp with LoRA needs --no-lora_merge (merging would swap modules inside the sharded model)"),
        (cfg["max_train"] is None or cfg["max_train"] > 0, "--max_train must be positive"),
        (cfg["num_threads"] >= 0, f"--num_threads {cfg['num_threads']}: must be >= 1 (0 = torch's default)"),
        (cfg["eval_n"] >= 0, f"--eval_n {cfg['eval_n']}: must be >= 0 (0 = no evaluation)"),
        (cfg["save_every"] >= 0, f"--save_every {cfg['save_every']}: must be >= 0 (0 = only at stage ends)"),
        (cfg["log_every"] >= 1, f"--log_every {cfg['log_every']}: must be >= 1"),
        (cfg["max_steps"] >= 0, f"--max_steps {cfg['max_steps']}: must be >= 0 (0 = from --epochs)"),
        (cfg["eval_k_shot"] >= 0 and cfg["eval_batch"] >= 1, "--eval_k_shot must be >= 0 and --eval_batch >= 1"),
        (cfg["warmup"] >= 0, f"--warmup {cfg['warmup']}: must be >= 0"),
        (0 <= cfg["min_lr_ratio"] <= 1, f"--min_lr_ratio {cfg['min_lr_ratio']}: must be in [0, 1]"),
        (cfg["weight_decay"] >= 0 and cfg["grad_clip"] >= 0, "--weight_decay and --grad_clip must be >= 0"),
        (cfg["iv_alpha0"] >= 0 and cfg["kl_min"] >= 0, "--iv_alpha0 and --kl_min must be >= 0"),
        (all(cfg[k] is None or cfg[k] >= 1 for k in ("iv_n_clean", "iv_n_corrupt", "iv_top_k")),
         "--iv_n_clean, --iv_n_corrupt and --iv_top_k must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TrainError(msg)
    try:
        cfg["lora_targets"] = ",".join(lora.parse_targets(cfg["lora_targets"]))
        b1, b2 = (float(x) for x in cfg["betas"].split(","))
    except ValueError as e:
        raise TrainError(f"bad flag value: {e}") from None
    cfg["betas"] = f"{b1},{b2}"
    for spec in cfg["iv_file"]:
        if "=" not in spec:
            raise TrainError(f"--iv_file {spec!r}: expected TASK=PATH")
    return cfg


def uses_iv(cfg) -> bool:
    """The trained model gets the (possibly zero-scaled) IV, or the reference does."""
    return cfg["guided"] or cfg["iv_alpha0"] > 0 or (needs_reference(cfg) and cfg["kl_iv"])


def needs_reference(cfg) -> bool:
    return cfg["kl_weight"] > 0 or cfg["head_mse_weight"] > 0


# ---------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is 1 process.

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag.startswith("cuda")
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    else:
        device = torch.device("cuda" if use_cuda else "cpu") if device_flag == "auto" else torch.device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(rank, world, local, device)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def barrier(d: Dist):
    if d.world > 1:
        import torch.distributed as dist
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Tasks and data. A training example is one token list: chat prompt + answer + end-of-turn token;
# only the answer part (incl. the end-of-turn token, so the model learns to stop) is trained on.

def load_task_list(spec: str | None, default_fn: str, what: str) -> list:
    """Tasks from a comma-separated list of registry names or files (any format tasks.load_task
    reads: the suite's x.train.jsonl + x.test.jsonl, Alpaca, TRACE, SuperNI); None = the default."""
    from ivft import tasks as task_lib
    try:
        if spec is None:
            names = list(getattr(task_lib, default_fn)())
        elif spec.strip().lower() == "none" and what == "general":
            return []
        else:
            names = [s.strip() for s in spec.split(",") if s.strip()]
        if not names and what == "training":
            raise TrainError("the training sequence is empty (--tasks)")
        out = []
        for name in names:
            task = task_lib.load_task(name)
            out.append(task)
    except (KeyError, ValueError, OSError) as e:
        raise TrainError(f"{what} tasks: {e.args[0] if e.args else e}") from None
    seen = [t.name for t in out]
    if len(set(seen)) != len(seen):
        raise TrainError(f"{what} tasks repeat a name: {seen}")
    return out


def encode_example(tok, ex, cfg) -> tuple[list[int], int]:
    """-> (token ids, prompt length). Prompt and answer are evaluate.py's (render_prompt zero-shot
    with the instruction; answer_ids = the answer + the end-of-turn token, which generation stops
    on, so it is trained on too): training and evaluation see the same tokens. A too-long prompt
    loses its start."""
    import evaluate
    prompt = list(evaluate.render_prompt(tok, ex, with_instruction=True))
    answer = list(evaluate.answer_ids(tok, ex.output))
    eot = evaluate.end_of_turn_id(tok)
    if answer[-1] != eot:
        answer.append(eot)
    answer = answer[:cfg["max_len"] - 1]
    keep = cfg["max_len"] - len(answer)
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep:]
    return prompt + answer, len(prompt)


@dataclass
class Item:
    ids: list       # prompt + answer token ids
    prompt_len: int
    task: int       # index into the training sequence (for replay rows and their IV)


def encode_task(tok, task, index: int, cfg) -> list[Item]:
    examples = list(task.train)[:cfg["max_train"]] if cfg["max_train"] else list(task.train)
    if not examples:
        raise TrainError(f"training task {task.name!r} has no training examples")
    return [Item(*encode_example(tok, ex, cfg), index) for ex in examples]


def stage_pool(encoded: list[list[Item]], j: int, cfg) -> list[Item]:
    """Training examples of stage j: task j's, plus (--replay) a fixed random sample of earlier ones."""
    pool = list(encoded[j])
    n_replay = int(round(cfg["replay"] * len(pool)))
    earlier = [it for i in range(j) for it in encoded[i]]
    if n_replay and earlier:
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + j)
        pick = torch.randint(len(earlier), (n_replay,), generator=g) if n_replay > len(earlier) \
            else torch.randperm(len(earlier), generator=g)[:n_replay]
        pool += [earlier[i] for i in pick.tolist()]
    return pool


def steps_for(n_items: int, cfg) -> int:
    if cfg["max_steps"] > 0:
        return cfg["max_steps"]
    return max(1, math.ceil(cfg["epochs"] * n_items / cfg["batch_size"]))


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, stage: int, epoch: int, n: int) -> tuple:
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 1009 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, step: int, cfg, stage: int) -> list[int]:
    """Example indices of optimizer step `step`: consecutive slices of a stream of per-epoch
    permutations. A pure function of (seed, stage, step), which is what makes resuming exact."""
    B = cfg["batch_size"]
    return [epoch_order(cfg["seed"], stage, pos // n, n)[pos % n] for pos in range(step * B, (step + 1) * B)]


def collate(items: list[Item], pad_id: int, device) -> dict:
    """Right-padded tensors of one micro-batch.

    idx (B, T) inputs = ids[:-1]; targets (B, T) = ids[1:] on answer positions, -100 elsewhere;
    pad_mask (B, T) True at real tokens (None when no row is padded: the fast causal path);
    last (B,) = index of each row's last prompt token, the position that predicts the first answer
    token and where the IV acts; task (B,) = each row's task index."""
    T = max(len(it.ids) - 1 for it in items)
    B = len(items)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    pad_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, it in enumerate(items):
        ids = torch.tensor(it.ids, dtype=torch.long)
        L = len(it.ids) - 1
        idx[b, :L] = ids[:-1]
        pad_mask[b, :L] = True
        targets[b, it.prompt_len - 1:L] = ids[it.prompt_len:]
    last = torch.tensor([it.prompt_len - 1 for it in items], dtype=torch.long)
    task = torch.tensor([it.task for it in items], dtype=torch.long)
    return {"idx": idx.to(device), "targets": targets.to(device),
            "pad_mask": None if pad_mask.all() else pad_mask.to(device),
            "last": last.to(device), "task": task.to(device), "n_tokens": int(pad_mask.sum())}


def step_micro_batches(pool: list[Item], step: int, cfg, stage: int, d: Dist) -> list[list[Item]]:
    """This rank's micro-batches of one optimizer step. The global batch is sorted by length first
    so that rows of similar length share a micro-batch (less padding), then dealt out in slices."""
    items = sorted((pool[i] for i in batch_indices(len(pool), step, cfg, stage)), key=lambda it: len(it.ids))
    mb = cfg["micro_batch"]
    chunks = [items[i:i + mb] for i in range(0, len(items), mb)]
    return chunks[d.rank::d.world]


# ---------------------------------------------------------------------------------------------
# Schedules

def lr_at(step: int, total: int, cfg) -> float:
    warm = int(cfg["warmup"] * total) if cfg["warmup"] < 1 else int(cfg["warmup"])
    peak, low = cfg["lr"], cfg["lr"] * cfg["min_lr_ratio"]
    if step < warm:
        return peak * (step + 1) / warm
    if cfg["lr_schedule"] == "constant" or total - warm <= 1:
        return peak
    progress = (step - warm) / (total - warm - 1)          # 0 at the first step after warmup, 1 at the last
    if cfg["lr_schedule"] == "linear":
        return peak + (low - peak) * progress
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))


def alpha_at(step: int, total: int, alpha0: float, schedule: str = "linear") -> float:
    """IV scale α_t of optimizer step `step` (0-based) of `total`: α_0 at the first step, exactly 0 at
    the last (so the model ends the task fitted without the IV), linear between."""
    if schedule == "constant" or total <= 1:
        return alpha0
    return alpha0 * (1.0 - step / (total - 1))


# ---------------------------------------------------------------------------------------------
# The loss: one module around the model, so that DDP/FSDP see the whole computation as one
# forward (the LM head runs on answer positions only, outside Transformer.forward).

def lm_head_fp32(model: Transformer, h):
    """Logits (N, V) in fp32 for hidden states h (N, C), autocast off: the LM head runs only on the
    few positions that are scored (answer tokens, last prompt tokens), so full precision is cheap,
    and a KL between two close distributions is otherwise dominated by bf16 rounding (~0.1 nats)."""
    w = model.lm_head.weight
    with torch.autocast(h.device.type, enabled=False):
        return model.lm_head(h.to(w.dtype)).float()


def kl_per_row(logits, ref_logits, temp: float):
    """KL(P ‖ Q) per row with P = softmax(logits/τ) (trained), Q = softmax(ref_logits/τ), in fp32.
    No τ² factor (the sibling code has none). (..., V) -> (...)"""
    logp = F.log_softmax(logits.float() / temp, dim=-1)
    logq = F.log_softmax(ref_logits.float() / temp, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass
class Guidance:
    """What the loss needs beyond the batch: set once per run, alpha updated every step."""
    ivs: torch.Tensor | None = None        # (n_tasks, C) the IV of every training task, zeros if none
    layers: torch.Tensor | None = None     # (n_tasks,) injection layer per task
    alpha: float = 0.0                     # α_t of the current step
    train_iv: bool = False                 # add α·IV in the trained model
    ref_iv: bool = False                   # add 1·IV in the reference
    kl_weight: float = 0.0
    kl_temp: float = 2.0
    kl_positions: str = "last"
    kl_min: float = 0.0
    mse_weight: float = 0.0
    heads: dict | None = None              # {layer: LongTensor of head indices} for the MSE term


def iv_intervention(g: Guidance, batch: dict, scale, record_z=()) -> Intervention:
    """The IV of each row's task, at that row's last prompt token, at that task's layer."""
    rows_iv = g.ivs[batch["task"]]                                        # (B, C)
    row_layer = g.layers[batch["task"]]                                   # (B,)
    add = {}
    for layer in row_layer.unique().tolist():
        # rows of tasks injected at another layer get a zero vector here
        add[layer] = rows_iv * (row_layer == layer).to(rows_iv.dtype)[:, None]
    return Intervention(pos=batch["last"], add_resid=add, scale=scale, record_z=record_z)


class LossModule(nn.Module):
    """forward(batch, norms) -> (scalar to backpropagate, detached parts for logging).

    norms = (answer tokens, rows) of the whole optimizer step over all ranks: each micro-batch's sums
    are divided by them, so gradient accumulation and any number of DDP ranks give the same gradient
    as one big batch (DDP averages over ranks, hence the factor `world`)."""

    def __init__(self, model: Transformer, world: int = 1):
        super().__init__()
        self.model = model
        self.world = world
        self.guidance = Guidance()
        # the frozen reference: None = the model itself with LoRA adapters off; kept out of the module
        # tree (a plain attribute in a list) so that DDP, state_dict and .parameters() never see it
        self._ref = [None]

    def set_reference(self, ref: Transformer | None):
        self._ref[0] = ref

    @torch.no_grad()
    def reference(self, batch):
        g = self.guidance
        ref = self._ref[0]
        ctx = lora.adapters_off(self.model) if ref is None else nullcontext()
        ref = self.model if ref is None else ref
        record = tuple(g.heads) if g.mse_weight > 0 else ()
        iv = iv_intervention(g, batch, 1.0, record) if g.ref_iv else Intervention(pos=batch["last"], record_z=record)
        idx, pad_mask = batch["idx"], batch["pad_mask"]
        if g.kl_positions == "last":
            # causal attention: nothing after the last prompt token matters there (for the KL and for
            # the heads' z), so the reference reads only the prompt part of the batch
            T = int(batch["last"].max()) + 1
            idx, pad_mask = idx[:, :T], (pad_mask[:, :T] if pad_mask is not None else None)
        with ctx:
            h = ref(idx, pad_mask=pad_mask, intervention=iv, return_hidden=True)   # (B, T, C)
            if g.kl_positions == "last":
                logits = lm_head_fp32(ref, h[torch.arange(len(h)), batch["last"]])       # (B, V)
            else:
                logits = lm_head_fp32(ref, h[batch["targets"] != -100])                  # (N, V)
        return logits, iv.z

    def forward(self, batch, norms):
        g = self.guidance
        n_tok, n_rows = norms[0], norms[1]
        record = tuple(g.heads) if g.mse_weight > 0 else ()
        iv = None
        if g.train_iv:
            iv = iv_intervention(g, batch, g.alpha, record)
        elif record:
            iv = Intervention(pos=batch["last"], record_z=record)
        h = self.model(batch["idx"], pad_mask=batch["pad_mask"], intervention=iv, return_hidden=True)
        sel = batch["targets"] != -100                                      # (B, T) answer positions
        logits = lm_head_fp32(self.model, h[sel])                            # (N, V): no logits elsewhere
        ce_sum = F.cross_entropy(logits, batch["targets"][sel], reduction="sum")
        loss = ce_sum / n_tok
        parts = {"ce": loss.detach()}
        if g.kl_weight > 0 or g.mse_weight > 0:
            ref_logits, ref_z = self.reference(batch)
            if g.kl_weight > 0:
                if g.kl_positions == "last":
                    mine = lm_head_fp32(self.model, h[torch.arange(len(h)), batch["last"]])   # (B, V)
                    kl = kl_per_row(mine, ref_logits, g.kl_temp)                       # (B,)
                    denom = n_rows
                else:
                    kl = kl_per_row(logits, ref_logits, g.kl_temp)                     # (N,)
                    denom = n_tok
                if g.kl_min > 0:
                    kl = kl * (kl.detach() > g.kl_min)
                kl = kl.sum() / denom
                loss = loss + g.kl_weight * kl
                parts["kl"] = kl.detach()
            if g.mse_weight > 0:
                mse = 0.0
                for layer, heads in g.heads.items():
                    # z: (B, 1, H, D) at the last prompt token -> the top heads only
                    diff = iv.z[layer][:, 0, heads].float() - ref_z[layer][:, 0, heads].float()
                    mse = mse + diff.pow(2).mean(dim=(-1,)).sum(-1)                    # (B,)
                n_heads = sum(len(h_) for h_ in g.heads.values())
                mse = (mse / n_heads).sum() / n_rows
                loss = loss + g.mse_weight * mse
                parts["mse"] = mse.detach()
        return loss * self.world, parts


# ---------------------------------------------------------------------------------------------
# Instruction vectors: extracted from the model before any training (cached by extract_iv), or
# given per task with --iv_file.

def prepare_ivs(cfg, model, tok, train_tasks) -> dict:
    """-> {task name: (iv (C,), layer, meta)} for every training task, validated against `model`."""
    import extract_iv
    files = dict(spec.split("=", 1) for spec in cfg["iv_file"])
    unknown = set(files) - {t.name for t in train_tasks}
    if unknown:
        raise TrainError(f"--iv_file names tasks not in the sequence: {sorted(unknown)}")
    out = {}
    for task in train_tasks:
        try:
            if task.name in files:
                iv, layer, meta = extract_iv.load_iv(files[task.name], model)
            else:
                tag = extract_iv.model_tag(cfg["model"])
                cache = Path(cfg["iv_dir"]) / tag / extract_iv.iv_filename(task)
                settings = {"method": cfg["iv_method"], "n_clean": cfg["iv_n_clean"],
                            "n_corrupt": cfg["iv_n_corrupt"], "top_k": cfg["iv_top_k"], "layer": cfg["iv_layer"]}
                # reused only when made from these weights, this task's data and these settings
                d = extract_iv.get_iv(model, tok, task, cache, model_id=tag, progress=True, **settings)
                iv, layer, meta = d["iv"], d["layer"], d.get("meta", {})
        except (ValueError, KeyError, OSError) as e:
            msg = str(e.args[0] if e.args else e)
            where = files.get(task.name, f"IV of task {task.name!r}")
            raise TrainError(msg if where in msg else f"{where}: {msg}") from None
        layer = cfg["iv_layer"] if cfg["iv_layer"] is not None else int(layer)
        if not 0 <= layer < model.n_layers:
            raise TrainError(f"IV layer {layer} is out of range: the model has layers 0..{model.n_layers - 1}")
        if tuple(iv.shape) != (model.config.hidden_size,):
            raise TrainError(f"IV of {task.name} has shape {tuple(iv.shape)}, the model needs "
                             f"({model.config.hidden_size},)")
        out[task.name] = (iv.detach().float().cpu(), layer, meta)
    return out


def top_heads(ivs: dict) -> dict:
    """{layer: LongTensor heads} of the union of the tasks' top heads (for --head_mse_weight)."""
    by_layer = {}
    for _, _, meta in ivs.values():
        for layer, head in (meta.get("heads") or []):
            by_layer.setdefault(int(layer), set()).add(int(head))
    return {l: torch.tensor(sorted(h)) for l, h in sorted(by_layer.items())}


# ---------------------------------------------------------------------------------------------
# Checkpoints. out_dir/stage-j = the model after task j; out_dir/last = a mid-task checkpoint
# (--save_every or Ctrl-C). Each is an HF directory (written by load.save_hf, atomically) holding the
# fine-tuned weights (LoRA adapters merged into the export), plus train_state.pt (optimizer, step,
# RNG, results so far), train_config.json and, with LoRA, the adapters in PEFT layout. The LoRA base
# is never stored twice: it is the original model or the previous stage's checkpoint.

class _Export:
    """What save_hf needs from a model (config + state_dict), for a state dict we built ourselves."""

    def __init__(self, config, sd):
        self.config, self._sd = config, sd

    def state_dict(self):
        return self._sd


def full_state_dict(model: nn.Module, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def save_checkpoint(path: Path, model: Transformer, tok, cfg: dict, state: dict, sd: dict | None = None):
    """sd: the full state dict when the model is sharded (FSDP), gathered by the caller on all ranks."""
    from safetensors.torch import save as st_save
    sd = model.state_dict() if sd is None else sd
    buf = io.BytesIO()
    torch.save(state, buf)
    extra = {"train_state.pt": buf.getvalue(), "train_config.json": cfg}
    if lora.has_lora(model):
        sd, adapters = lora.split_state_dict(sd, lora.scale_of(model))
        extra["adapter_model.safetensors"] = st_save(adapters, metadata={"format": "pt"})
        extra["adapter_config.json"] = lora.adapter_config(model, cfg["model"])
    try:
        save_hf(_Export(model.config, sd), tok, path, extra_files=extra)
    except OSError as e:   # a full disk's error names no file: say which checkpoint failed
        raise TrainError(f"{path}: cannot write the checkpoint ({e.strerror or e}); the previous "
                         f"checkpoint is kept") from None


def read_state(path: Path) -> dict:
    try:
        return torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises many kinds of errors
        raise TrainError(f"{path / 'train_state.pt'}: corrupt or unreadable training state "
                         f"({type(e).__name__})") from None


def newest_checkpoint(out_dir: Path, notes: list | None = None) -> Path | None:
    """The checkpoint furthest along, by (tasks done, steps into the next task), among those whose
    training state loads: an unreadable one is skipped (and named in `notes`), so that one damaged
    file falls back to the previous checkpoint instead of blocking the resume."""
    best, key = None, None
    for p in [*out_dir.glob("stage-*"), out_dir / "last"]:
        if not (p / "train_state.pt").is_file():
            continue
        try:
            st = read_state(p)
        except TrainError as e:
            if notes is not None:
                notes.append(f"skipped {p}: {e}")
            continue
        k = (st["stage_done"], st["step"])
        if key is None or k > key:
            best, key = p, k
    return best


def load_weights_into(model: Transformer, path: Path):
    """Copy the weights of the HF checkpoint at `path` into `model` (same config). Read through
    load.py, which undoes the export's per-family layout (e.g. GPT-2's fused Conv1D weights)."""
    from ivft.load import load_hf_dir
    try:
        saved, _ = load_hf_dir(path, dtype=model.model.embed_tokens.weight.dtype)
    except LoadError as e:
        raise TrainError(str(e)) from None
    own = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    theirs = saved.state_dict()
    if set(own) != set(theirs) or any(theirs[k].shape != v.shape for k, v in own.items()):
        raise TrainError(f"{path}: weights do not match the model being trained")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(theirs[k])


def check_writable(out_dir: Path):
    """Fail before the model loads, naming the folder, if out_dir cannot be created or written."""
    import evaluate
    try:
        evaluate.check_writable(out_dir)
    except OSError as e:
        raise TrainError(f"--out_dir {out_dir}: {e}") from None


def write_json_atomic(path: Path, obj):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TrainError(f"{path}: cannot write ({e.strerror or e})") from None


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(st["python"]), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------------
# Evaluation glue (evaluate.py does the scoring)

def eval_metrics(task, general: bool, cfg) -> tuple:
    """What a stage report needs of one task (--eval_metrics needed): its primary score; for the
    general suite also the primary score in-context (IP), choice accuracy and the knowledge log-prob; everywhere
    the instruction log-prob (docs/method.md §1: instruction vs knowledge). 'all' = every metric."""
    import evaluate
    if cfg["eval_metrics"] == "all":
        return tuple(evaluate.METRICS)
    primary = evaluate.canonical_metric(task.metric)
    out = [primary, "instruction_logprob"]
    if general:
        # knowledge side (docs/method.md §1): the ranking of answers and the plain-text log-prob
        out += ["choice_accuracy", "knowledge_logprob"]
        if cfg["eval_k_shot"] > 0:
            out += [primary + evaluate.KSHOT_SUFFIX, "instruction_logprob" + evaluate.KSHOT_SUFFIX]
    return tuple(dict.fromkeys(out))


def evaluate_stage(model, tok, train_tasks, general, cfg, label: str, amp_dtype) -> dict:
    """One evaluate.py report for this stage: the training tasks zero-shot, the general suite
    zero-shot (GP) and k-shot (IP). Tasks are grouped by the metrics they need (one evaluate_suite
    call per group), since e.g. greedy decoding for a likelihood-scored task would only cost time."""
    import evaluate
    dtype = "bfloat16" if amp_dtype == torch.bfloat16 else "float32"
    groups = {}
    for task in train_tasks:
        groups.setdefault((eval_metrics(task, False, cfg), 0), []).append(task)
    for task in general:
        groups.setdefault((eval_metrics(task, True, cfg), cfg["eval_k_shot"]), []).append(task)
    report = {"model": label, "tasks": {}, "primary": {}, "settings": {"seconds": 0.0, "groups": []}}
    for (metrics, k), tasks in groups.items():
        r = evaluate.evaluate_suite(model, tok, tasks, n=cfg["eval_n"], k_shot=k, metrics=metrics, dtype=dtype,
                                    batch_size=cfg["eval_batch"], model_name=label, progress=True)
        report["tasks"].update(r["tasks"])
        report["primary"].update(r["primary"])
        report["settings"]["seconds"] = round(report["settings"]["seconds"] + r["settings"]["seconds"], 1)
        report["settings"]["groups"].append(r["settings"])
    # keep the sequence's order (training tasks first, then the general suite)
    report["tasks"] = {t.name: report["tasks"][t.name] for t in [*train_tasks, *general]}
    return report


def compute_metrics(stages: list, train_tasks, general) -> dict:
    import evaluate
    if len(stages) < 2:
        return {}
    return evaluate.cl_metrics(stages, [t.name for t in train_tasks], [t.name for t in general])


def print_stage(results: dict, cl: dict):
    import evaluate
    print(f"\n== {results['stages'][-1]['model']} ==")
    evaluate.print_table(results["stages"][-1])
    if cl:
        evaluate.print_cl(cl)


# ---------------------------------------------------------------------------------------------
# Logging

class Logger:
    def __init__(self, out_dir: Path, cfg: dict, enabled: bool):
        self.enabled = enabled
        self.file = out_dir / "log.txt"
        self.wandb = None
        if enabled and cfg["wandb"]:
            try:
                import wandb
            except ImportError:
                raise TrainError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=cfg["wandb_project"], config=cfg, dir=str(out_dir))

    def line(self, text: str, echo: bool = True):
        if not self.enabled:
            return
        try:
            with open(self.file, "a") as f:
                f.write(text + "\n")
        except OSError as e:
            raise TrainError(f"{self.file}: cannot write ({e.strerror or e})") from None
        if echo:
            from tqdm import tqdm
            tqdm.write(text)

    def metrics(self, d: dict, step: int):
        if self.wandb is not None:
            self.wandb.log(d, step=step)


# ---------------------------------------------------------------------------------------------
# Ctrl-C: the first one asks the loop to stop after the current optimizer step and save; a second
# one interrupts at once (the last checkpoint is then kept).

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))
TERMINATED = {"by": None}     # the signal that stopped the run (main() turns it into the exit status)


class StopFlag:
    """SIGTERM (what job schedulers send before a kill) is handled exactly like Ctrl-C."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading_main():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        TERMINATED["by"] = signum
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving a checkpoint (again to abort now)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _terminate(signum, frame):
    # outside the training loop (loading, evaluation) SIGTERM interrupts like Ctrl-C, so that the
    # code that saves on KeyboardInterrupt runs for it too
    TERMINATED["by"] = signum
    raise KeyboardInterrupt


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------
# The run

@dataclass
class Run:
    """Everything the stages share, so that functions below take one argument instead of twelve."""
    cfg: dict
    d: Dist
    out_dir: Path
    model: Transformer
    tok: object
    train_tasks: list
    general: list
    encoded: list            # per training task: its encoded Items
    loss: LossModule
    original: Transformer | None   # frozen copy of the model before training, when a stage needs it
    amp_dtype: torch.dtype | None
    log: "Logger"
    results: dict

    def amp(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype)


def train(cfg: dict, step_callback=None) -> dict:
    """Run (or resume) the whole sequence. `step_callback(stage, step, model)` is called after every
    optimizer step (tests use it to interrupt or poison a run). Returns the results dict."""
    d = setup_distributed(cfg["device"])
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    out_dir = Path(cfg["out_dir"])

    # ---- validate everything before anything is written to out_dir ----------------------------
    train_tasks = load_task_list(cfg["tasks"], "default_sequence", "training")
    general = load_task_list(cfg["general"], "general_suite", "general")
    if cfg["fsdp"] and d.world == 1:
        raise TrainError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
    if cfg["batch_size"] % (cfg["micro_batch"] * d.world):
        # every rank must run the same number of micro-batches per step, or the collectives hang
        raise TrainError(f"--batch_size {cfg['batch_size']} must be a multiple of --micro_batch "
                         f"{cfg['micro_batch']} x {d.world} process(es)")
    amp_dtype = resolve_amp(cfg, d.device)
    check_writable(out_dir)
    notes = clean_leftovers(out_dir) if d.main else []    # before looking for checkpoints: a swap
    barrier(d)                                            # cut short may have to be moved back
    resume_from, state = None, None
    entries = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    early_death = bool(entries) and entries <= RUN_START_FILES   # a start that died: nothing to resume
    # training states are read (they hold the optimizer: large) only when resuming
    ckpt = newest_checkpoint(out_dir, notes) if cfg["resume"] and out_dir.is_dir() else None
    for line in notes:
        print(line, file=sys.stderr)
    if cfg["resume"]:
        if ckpt is None and entries and not early_death:
            raise TrainError(f"--resume: no readable checkpoint in {out_dir}" +
                             (f" ({notes[-1]})" if notes else ""))
        if ckpt is None:
            print(f"--resume: no checkpoint in {out_dir} yet: starting from the beginning", file=sys.stderr)
        else:
            resume_from = ckpt
            check_resume_config(resume_from, cfg)
            state = read_state(resume_from)
            if state["stage_done"] == len(train_tasks) and state["step"] == 0:
                # a finished run is left exactly as it is
                print(f"{out_dir}: this run is finished ({len(train_tasks)} tasks); nothing to resume, "
                      f"nothing changed. Results: {out_dir / 'results.json'}", file=sys.stderr)
                res = out_dir / "results.json"
                return json.loads(res.read_text()) if res.is_file() else {"config": cfg, "stages": state["stages"]}
    elif entries and not early_death and not cfg["overwrite"]:
        raise TrainError(f"{out_dir} already holds a run: pass --resume to continue it or --overwrite")
    try:
        model, tok = load_model(cfg["model"], dtype=torch.bfloat16 if cfg["model_dtype"] == "bf16" else torch.float32,
                                device=d.device)
    except LoadError as e:
        raise TrainError(str(e)) from None
    if tok is None:
        raise TrainError(f"{cfg['model']}: no tokenizer files next to the weights")
    if cfg["iv_layer"] is not None and not 0 <= cfg["iv_layer"] < model.n_layers:
        raise TrainError(f"--iv_layer {cfg['iv_layer']} is out of range: the model has layers "
                         f"0..{model.n_layers - 1}")
    encoded = [encode_task(tok, t, i, cfg) for i, t in enumerate(train_tasks)]
    # IVs come from the model before any training: extracted (or loaded) before the weights of a
    # resumed run are restored
    ivs = prepare_ivs(cfg, model, tok, train_tasks) if uses_iv(cfg) else {}
    heads = top_heads(ivs) if cfg["head_mse_weight"] > 0 else None
    if cfg["head_mse_weight"] > 0 and not heads:
        raise TrainError("--head_mse_weight needs IVs whose metadata names their top heads")
    original = frozen_copy(model) if needs_original_copy(cfg, len(train_tasks)) else None
    if state is not None:
        restore_model(model, resume_from, state, cfg, out_dir)

    # ---- from here on we write ------------------------------------------------------------------
    if d.main:
        if (cfg["overwrite"] and not cfg["resume"]) or early_death:
            # what an earlier run wrote here (an early death left only its start files)
            for p in [*out_dir.glob("stage-*"), out_dir / "last", out_dir / "results.json", out_dir / "log.txt"]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "train_config.json", cfg)
    barrier(d)
    log = Logger(out_dir, cfg, d.main)
    if d.main:
        print("config:\n" + "\n".join(f"  {k} = {v}" for k, v in cfg.items()))
        log.line(f"config: {json.dumps(cfg, sort_keys=True)}", echo=False)
        for n, (v, l, _) in ivs.items():
            log.line(f"IV {n}: layer {l}, norm {v.norm():.3f}")

    loss = LossModule(model, d.world)
    g = loss.guidance
    if ivs:
        g.ivs = torch.stack([ivs[t.name][0] for t in train_tasks]).to(d.device)          # (n_tasks, C)
        g.layers = torch.tensor([ivs[t.name][1] for t in train_tasks], device=d.device)  # (n_tasks,)
    g.train_iv = bool(ivs) and (cfg["guided"] or cfg["iv_alpha0"] > 0)
    g.ref_iv = bool(ivs) and cfg["kl_iv"]
    g.kl_weight, g.kl_temp, g.kl_positions = cfg["kl_weight"], cfg["kl_temp"], cfg["kl_positions"]
    g.kl_min, g.mse_weight, g.heads = cfg["kl_min"], cfg["head_mse_weight"], heads
    run = Run(cfg, d, out_dir, model, tok, train_tasks, general, encoded, loss, original, amp_dtype, log,
              {"config": cfg, "stages": [], "metrics": {}})

    start_stage, start_step = 0, 0
    if state is not None:
        run.results["stages"] = state["stages"]
        start_stage, start_step = state["stage_done"], state["step"]
        log.line(f"resuming from {resume_from}: {start_stage} task(s) done, step {start_step} of the next")
    elif cfg["eval_n"] > 0:
        evaluate_and_record(run, "stage 0 (original model)")

    # the global RNG drives LoRA init and dropout: seeded once here, the same on every rank (FSDP
    # keeps each rank's shard of a freshly initialised adapter, so all ranks must draw the same
    # init); on resume it is set to what it was at the checkpoint (run_stage sets it again after
    # rebuilding a mid-task stage)
    if state is not None:
        set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
    else:
        torch.manual_seed(cfg["seed"])
        random.seed(cfg["seed"])

    for j in range(start_stage, len(train_tasks)):
        mid_task = state is not None and j == start_stage and start_step > 0
        run_stage(run, j, state if mid_task else None, step_callback)

    if d.main:
        m = run.results["metrics"]
        if m:
            log.line("final: " + "  ".join(f"{k} {m[k]:+.4f}" for k in m if isinstance(m[k], (int, float))))
        write_json_atomic(out_dir / "results.json", run.results)
        log.line(f"done: {out_dir / 'results.json'}")
    barrier(d)
    return run.results


def stage0_key(run: Run) -> dict:
    """What the original model's report depends on: the model (config + a weight fingerprint), the
    tasks and the evaluation flags. --stage0_cache reuses a saved report only when all agree."""
    from extract_iv import weight_fingerprint
    keys = ("model", "model_dtype", "eval_n", "eval_k_shot", "eval_metrics", "dtype", "device")
    return {"cfg": {k: run.cfg[k] for k in keys}, "weights": weight_fingerprint(run.model),
            "train_tasks": [t.name for t in run.train_tasks], "general": [t.name for t in run.general]}


def evaluate_and_record(run: Run, label: str):
    """Evaluate on rank 0 (the others wait; under FSDP every rank runs the same evaluation, since
    each forward gathers the shards of all ranks), append the report, recompute the metrics, print
    the tables and rewrite results.json."""
    cache = run.cfg.get("stage0_cache") if label.startswith("stage 0") else None
    key = stage0_key(run) if cache else None
    report = None
    if cache and os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("key") == key:
            report = saved["report"]
    if report is None and (run.d.main or run.cfg["fsdp"]):
        report = evaluate_stage(run.model, run.tok, run.train_tasks, run.general, run.cfg, label, run.amp_dtype)
        if cache and run.d.main:
            write_json_atomic(Path(cache), {"key": key, "report": report})
    if run.d.main:
        r = run.results
        r["stages"].append(report)
        cl = compute_metrics(r["stages"], run.train_tasks, run.general)
        r["metrics"] = {k: cl.get(k) for k in ("AP", "BWT", "FWT", "GP_drop", "IP_drop")} if cl else {}
        r["cl"] = cl
        print_stage(r, cl)
        write_json_atomic(run.out_dir / "results.json", r)
    barrier(run.d)


def resolve_amp(cfg, device):
    """The autocast dtype, or None for plain fp32. auto = bf16 where the hardware has it: CUDA with
    bf16 support, or a CPU with native bf16 matmuls (AVX512-BF16 / AMX, what oneDNN reports). An
    AVX2-only CPU emulates bf16 matmuls: 5-9x slower than fp32 on the 135M model, not faster."""
    if cfg["dtype"] == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        try:
            ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            ok = False
    if cfg["dtype"] == "bf16" and not ok and device.type == "cuda":
        raise TrainError("this GPU does not support bf16; use --dtype fp32")
    if cfg["dtype"] == "bf16":
        return torch.bfloat16   # asked for explicitly: honoured on a CPU too, slow or not
    return torch.bfloat16 if ok else None


def frozen_copy(model: Transformer) -> Transformer:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def check_resume_config(ckpt: Path, cfg: dict):
    try:
        saved = json.loads((ckpt / "train_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{ckpt / 'train_config.json'}: unreadable ({type(e).__name__})") from None
    diff = sorted(k for k in set(saved) | set(cfg) if k not in RESUME_FREE and saved.get(k) != cfg.get(k))
    if diff:
        k = diff[0]
        raise TrainError(f"--resume: the checkpoint was made with {k}={saved.get(k)!r}, now {k}={cfg.get(k)!r} "
                         f"({len(diff)} setting(s) differ: {', '.join(diff)}); rerun with the same flags")


def restore_model(model, ckpt: Path, state: dict, cfg, out_dir: Path):
    """Put the weights of checkpoint `ckpt` into `model` (which holds the original weights).
    Full fine-tuning: the checkpoint's weights. LoRA: the base (the original, or the last merged
    stage's checkpoint) plus the checkpoint's adapters: the checkpoint's own model.safetensors has
    the adapters merged in, and merging rounds, so it cannot give back the exact base."""
    j, step = state["stage_done"], state["step"]
    if cfg["lora_r"] == 0:
        load_weights_into(model, ckpt)
        return
    if cfg["lora_merge"] and j > 0:
        load_weights_into(model, out_dir / f"stage-{j}")
    if cfg["lora_merge"] and step == 0:
        return  # a stage boundary after a merge: the next stage starts fresh adapters
    from ivft.load import read_safetensors
    lora.add_lora(model, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"].split(","))
    try:
        lora.load_adapter_state_dict(model, read_safetensors(ckpt / "adapter_model.safetensors"))
    except (LoadError, ValueError) as e:
        raise TrainError(f"{ckpt}: {e}") from None


def run_stage(run: Run, j: int, state: dict | None, step_callback=None):
    """Train task j (0-based), then merge/evaluate/checkpoint. `state` = a mid-task checkpoint's
    training state to continue from (None: start the task)."""
    cfg, d, model, tok, log = run.cfg, run.d, run.model, run.tok, run.log
    task, n_tasks = run.train_tasks[j], len(run.train_tasks)
    # ---- adapters, reference and optimizer of this stage -----------------------------------------
    if cfg["lora_r"] > 0 and not lora.has_lora(model):
        lora.add_lora(model, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"].split(","))
    if needs_reference(cfg):
        run.loss.set_reference(pick_reference(j, run.original, cfg, run.out_dir, model.model.embed_tokens.weight))
    # wrapped first: FSDP replaces the parameters by sharded ones, which the optimizer must hold
    wrapped = wrap_for_parallel(run.loss, cfg, d)
    params = [p for p in model.parameters() if p.requires_grad]
    b1, b2 = (float(x) for x in cfg["betas"].split(","))
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(b1, b2), weight_decay=cfg["weight_decay"])
    step = 0
    if state is not None:
        try:
            if cfg["fsdp"]:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(run.loss, opt, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainError(f"optimizer state does not fit the model ({e})") from None
        set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
        step = state["step"]
    pool = stage_pool(run.encoded, j, cfg)
    total = steps_for(len(pool), cfg)
    model.train()

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, desc=f"task {j + 1}/{n_tasks} {task.name}", disable=not d.main,
               dynamic_ncols=True)
    rng_boundary = rng_state()          # the RNG as it was after the last completed step
    t_log, tok_log, in_update = time.time(), 0, False
    try:
        with StopFlag() as stop:
            while step < total:
                t0 = time.time()
                micro = [collate(c, tok.pad_id, d.device) for c in step_micro_batches(pool, step, cfg, j, d)]
                # normalisers of the whole step over all ranks (see LossModule)
                counts = torch.tensor([sum(int((m["targets"] != -100).sum()) for m in micro),
                                       sum(len(m["idx"]) for m in micro), sum(m["n_tokens"] for m in micro)],
                                      dtype=torch.float64, device=d.device)
                n_ans, n_rows, n_seen = all_reduce_sum(counts, d).tolist()
                # as a tensor, not floats: torch.compile would specialise on every new value
                norms = torch.tensor([n_ans, n_rows], device=d.device)
                run.loss.guidance.alpha = alpha = alpha_at(step, total, cfg["iv_alpha0"], cfg["alpha_schedule"])
                lr = lr_at(step, total, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                logged = {}
                for i, batch in enumerate(micro):
                    # DDP: all-reduce the gradients only after the last micro-batch
                    sync = i == len(micro) - 1 or not hasattr(wrapped, "no_sync")
                    with nullcontext() if sync else wrapped.no_sync():
                        with run.amp():
                            loss, parts = wrapped(batch, norms)
                        loss.backward()
                    for k, v in parts.items():
                        logged[k] = logged.get(k, 0.0) + v.float()
                keys = sorted(logged)
                vals = all_reduce_sum(torch.stack([logged[k] for k in keys]).double(), d) if keys else []
                logged = dict(zip(keys, [float(v) for v in vals]))
                total_loss = logged.get("ce", 0.0) + cfg["kl_weight"] * logged.get("kl", 0.0) + \
                    cfg["head_mse_weight"] * logged.get("mse", 0.0)
                if not math.isfinite(total_loss):
                    last = newest_checkpoint(run.out_dir)
                    raise Diverged(f"loss is {total_loss} at task {j + 1} ({task.name}) step {step + 1}/{total} "
                                   f"(lr {lr:.2e}): stopped without saving; last good checkpoint: "
                                   f"{last or 'none'}. Try a lower --lr")
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
                in_update = True    # a second Ctrl-C in here leaves half-updated weights: not saved
                opt.step()
                in_update = False
                opt.zero_grad(set_to_none=True)
                step += 1
                rng_boundary = rng_state()
                if step_callback is not None:
                    step_callback(j, step, model)

                # ---- progress -------------------------------------------------------------------
                dt = time.time() - t0
                tok_log += n_seen
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{n_seen / max(dt, 1e-9):.0f}")
                if step % cfg["log_every"] == 0 or step == total:
                    el = time.time() - t_log
                    extra = "".join(f" {k} {logged[k]:.4f}" for k in ("kl", "mse") if k in logged)
                    log.line(f"task {j + 1}/{n_tasks} {task.name} | step {step}/{total} | loss {total_loss:.4f} "
                             f"ce {logged.get('ce', 0.0):.4f}{extra} | alpha {alpha:.3f} | lr {lr:.2e} | "
                             f"gnorm {float(gnorm):.3f} | {tok_log / max(el, 1e-9):.0f} tok/s | dt {dt:.2f}s | "
                             f"eta {fmt_time(dt * (total - step))}")
                    log.metrics({"loss": total_loss, **logged, "lr": lr, "alpha": alpha,
                                 "grad_norm": float(gnorm), "task": j + 1}, step=step)
                    t_log, tok_log = time.time(), 0
                if cfg["save_every"] and step % cfg["save_every"] == 0 and step < total:
                    save_mid_task(run, opt, j, step, rng_boundary)
                # every rank stops at the same step, or DDP's collectives would hang
                if all_reduce_sum(torch.tensor([float(stop.requested)], device=d.device), d).item() > 0:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()  # before any message, so that it starts on a line of its own
        if in_update:
            log.line("interrupted inside an optimizer update: nothing saved, the last checkpoint is kept")
            raise
        save_mid_task(run, opt, j, step, rng_boundary)
        log.line(f"interrupted at task {j + 1} step {step}/{total}: saved {run.out_dir / 'last'}; "
                 "rerun the same command with --resume to continue")
        raise
    finally:
        bar.close()

    # ---- end of the task: evaluate, merge, checkpoint --------------------------------------------
    if cfg["eval_n"] > 0:
        try:
            # before merging: a Ctrl-C here saves the trained task (step = total) with its adapters
            # as they are, and --resume goes straight to this evaluation
            evaluate_and_record(run, f"stage {j + 1} (after {task.name})")
        except KeyboardInterrupt:
            save_mid_task(run, opt, j, total, rng_boundary)
            log.line(f"interrupted while evaluating task {j + 1}: saved {run.out_dir / 'last'}; "
                     "rerun the same command with --resume to continue")
            raise
    if cfg["lora_r"] > 0 and cfg["lora_merge"]:
        lora.merge(model)
    state = {"stage_done": j + 1, "step": 0, "rng": gather_rng(rng_state(), d), "stages": run.results["stages"],
             "tasks": [t.name for t in run.train_tasks], "version": 1}
    sd = full_state_dict(model, True) if cfg["fsdp"] else None
    if d.main:
        path = run.out_dir / f"stage-{j + 1}"
        save_checkpoint(path, model, tok, cfg, state, sd)
        # the mid-task checkpoint of this task is now behind: drop it so that resume never picks it
        shutil.rmtree(run.out_dir / "last", ignore_errors=True)
        write_json_atomic(run.out_dir / "results.json", run.results)
        log.line(f"task {j + 1}/{n_tasks} {task.name} done: saved {path}")
    barrier(d)
    model.train()


def lora_base(j: int, cfg) -> set:
    """What the LoRA base weights (adapters off) are during stage j: {"original"} and/or {"previous"}."""
    if cfg["lora_r"] == 0:
        return set()
    out = set()
    if not cfg["lora_merge"] or j == 0:
        out.add("original")       # never merged, or nothing merged yet
    if cfg["lora_merge"] or j == 0:
        out.add("previous")       # merged after every task: the base is the previous stage's model
    return out


def pick_reference(j: int, original, cfg, out_dir: Path, like: torch.Tensor):
    """The frozen reference of stage j. None = the trained model itself with its LoRA adapters off
    (no second copy). The previous stage's model is read back from its checkpoint, which is the same
    tensors whether or not this run was resumed."""
    if cfg["kl_ref"] in lora_base(j, cfg):
        return None
    if cfg["kl_ref"] == "original" or j == 0:
        return original
    try:
        ref, _ = load_model(out_dir / f"stage-{j}", dtype=like.dtype, device=like.device)
    except LoadError as e:
        raise TrainError(f"--kl_ref previous needs the checkpoint of task {j}: {e}") from None
    return frozen_copy(ref)


def needs_original_copy(cfg, n_tasks: int) -> bool:
    """Whether some stage's reference is the original model that the LoRA base cannot stand in for."""
    if not needs_reference(cfg):
        return False
    stages = range(n_tasks)
    if cfg["kl_ref"] == "original":
        return any("original" not in lora_base(j, cfg) for j in stages)
    return "previous" not in lora_base(0, cfg)   # stage 0's "previous" is the original


def wrap_for_parallel(loss_module, cfg, d):
    if cfg["compile"]:
        # dynamic: sequence lengths change from batch to batch; without it the first few steps
        # would each recompile
        loss_module = torch.compile(loss_module, dynamic=True)
    if d.world == 1:
        return loss_module
    if cfg["fsdp"]:
        from torch.distributed.fsdp import fully_shard
        if not getattr(loss_module, "_sharded", False):
            # one unit per block, and the model itself as the root unit holding the embedding, final
            # norm and LM head. It keeps those gathered after its forward (reshard_after_forward
            # False): the loss calls lm_head after Transformer.forward returns, and so do
            # evaluate.py and the adapters-off reference
            for block in loss_module.model.model.layers:
                fully_shard(block)
            fully_shard(loss_module.model, reshard_after_forward=False)
            loss_module._sharded = True
        return loss_module
    from torch.nn.parallel import DistributedDataParallel as DDP
    kw = {"device_ids": [d.device.index]} if d.device.type == "cuda" else {}
    return DDP(loss_module, **kw)


def gather_rng(st: dict, d: Dist) -> list:
    if d.world == 1:
        return [st]
    import torch.distributed as dist
    out = [None] * d.world
    dist.all_gather_object(out, st)
    return out


def save_mid_task(run: Run, opt, j: int, step: int, rng: dict):
    """The resumable checkpoint out_dir/last: weights, optimizer, step, RNG of every rank, results."""
    d, sd = run.d, None
    if run.cfg["fsdp"]:
        # sharded parameters and optimizer state: gathered to full tensors (every rank takes part)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        sd = full_state_dict(run.model, True)
        optim = get_optimizer_state_dict(run.loss, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optim = opt.state_dict()
    state = {"stage_done": j, "step": step, "optimizer": optim, "rng": gather_rng(rng, d),
             "stages": run.results["stages"], "version": 1}
    if d.main:
        save_checkpoint(run.out_dir / "last", run.model, run.tok, run.cfg, state, sd)
    barrier(d)


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------

def main(argv=None, step_callback=None) -> dict:
    args = build_parser().parse_args(argv)
    TERMINATED["by"] = None
    old = signal.signal(signal.SIGTERM, _terminate) if hasattr(signal, "SIGTERM") and threading_main() else None
    try:
        cfg = resolve_config(args)
        return train(cfg, step_callback=step_callback)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code)
    except KeyboardInterrupt:
        sig = TERMINATED["by"] or signal.SIGINT
        print("terminated" if sig != signal.SIGINT else "interrupted", file=sys.stderr)
        raise SystemExit(128 + int(sig))       # 130 after Ctrl-C, 143 after SIGTERM
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        # a process group left to the interpreter's exit can abort there ("terminate called without
        # an active exception" from gloo's threads): close it while everything is still alive
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
