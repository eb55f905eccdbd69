"""train.py's flags: the run's own (which model, I/O, system: add_run_flags), the help formatter, and
every value checked with a message naming the flag (check_flags, check_launch). The method's flags,
their defaults and the presets are train.py's."""
from __future__ import annotations

import argparse
import math
import os

from ivft import lora
from ivft.files import check_writable
from ivft.errors import TrainError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # every flag shows its default, as the parser holds it (presets applied: `--guided --help` shows
    # what --guided runs with); "(default: None)" and "(default: False)" would say nothing
    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def add_run_flags(p: argparse.ArgumentParser):
    """train.py's flags about which model a run trains (and in which regime: full or LoRA), and where
    and how it runs; not the method's, which train.py defines itself."""
    g = p.add_argument_group("model").add_argument
    g("--model", default=None, help="HF directory or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    g("--model_dtype", default="fp32", choices=["fp32", "bf16"],
      help="storage dtype of the weights: bf16 halves a frozen LoRA base; full fine-tuning then keeps fp32 "
      "master weights and moments in the optimizer")
    g("--lora_r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    g("--lora_alpha", type=float, default=16.0, help="LoRA scale numerator (scale = alpha/r)")
    g("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input")
    g("--lora_targets", default="q_proj,v_proj", help=f"linear layers to adapt ({','.join(lora.KNOWN_TARGETS)})")
    g("--lora_merge", action=argparse.BooleanOptionalAction, default=True, help="merge the adapters after "
      "every task and start fresh ones (as the sibling code); --no-lora_merge: one adapter for all tasks")

    g = p.add_argument_group("I/O").add_argument
    g("--out_dir", default=None, help="where checkpoints, log.txt and results.json go "
      "(default runs/<preset>, with -lora and -quick suffixes for --regime lora and --quick)")
    g("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    g("--accept_changed_inputs", action="store_true", help="with --resume: continue although the task data "
      "or the base model changed since the checkpoint (a warning instead of the refusal)")
    g("--overwrite", action="store_true", help="start afresh in an out_dir that holds a run")
    g("--save_every", type=int, default=0, help="also write a resumable checkpoint (out_dir/last) every N "
      "optimizer steps; 0 = only after each task")
    g("--log_every", type=int, default=10, help="log line every N optimizer steps")
    g("--wandb", action="store_true", help="also log to Weights & Biases (lazy import)")
    g("--wandb_project", default="iv-guided-ft", help="wandb project name")

    g = p.add_argument_group("system").add_argument
    g("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="autocast dtype for training and "
      "evaluation (auto = bf16 where the hardware has native bf16 matmuls, else fp32)")
    g("--compile", action="store_true", help="torch.compile the plain (unguided) training step")
    g("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun")
    g("--num_threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    g("--grad_checkpointing", action="store_true", help="recompute each block in the backward pass instead "
      "of keeping its activations: about a third more compute, 10-20x less activation memory")
    g("--dry_run", nargs="?", type=float, const=0.0, default=None, metavar="GiB", help="print the memory plan "
      "of these flags from the model's config.json alone (no weights) against the device's memory (or GiB, "
      "to plan for another device) and exit; refuses in one line, naming the flag to change, if it cannot fit")


# flags that may differ between a run and its --resume (they do not change the numbers)
RESUME_FREE = {"resume", "overwrite", "accept_changed_inputs", "save_every", "log_every", "wandb", "wandb_project", "num_threads",
               "grad_checkpointing", "dry_run",   # recomputation gives the same numbers
               "stage0_cache", "out_dir",   # out_dir: a moved or copied run resumes where it now is
               "code"}                      # a change of the code is warned about (check_resume_config)
# what a run writes before its first checkpoint: a folder holding only these was a start that died
# early (killed, or stopped by an error), and a rerun may start over in it
RUN_START_FILES = {"train_config.json", "log.txt", "results.json", "run.lock"}


def check_flags(cfg: dict) -> dict:
    """Check every value (one line naming the flag); no files are touched here. -> cfg, with --betas
    and --lora_targets in their canonical spelling."""
    checks = [
        (all(math.isfinite(v) for v in cfg.values() if isinstance(v, float)),
         "numeric flags must be finite: " + ", ".join(f"--{k} {v}" for k, v in cfg.items()
                                                      if isinstance(v, float) and not math.isfinite(v))),
        (cfg["batch_size"] > 0, f"--batch_size {cfg['batch_size']}: must be positive"),
        (cfg["micro_batch"] is None or cfg["micro_batch"] > 0, f"--micro_batch {cfg['micro_batch']}: must be positive"),
        (cfg["max_len"] >= 8, "--max_len must be at least 8"),
        (cfg["lr"] > 0, "--lr must be positive"),
        (cfg["epochs"] > 0 or cfg["max_steps"] > 0, "--epochs or --max_steps must be positive"),
        (0 <= cfg["replay"] <= 10, "--replay must be a fraction in [0, 10]"),
        (cfg["kl_temp"] > 0, "--kl_temp must be positive"),
        (cfg["kl_weight"] >= 0 and cfg["head_mse_weight"] >= 0, "loss weights must be >= 0"),
        (cfg["lora_r"] >= 0, "--lora_r must be >= 0"),
        (0 <= cfg["lora_dropout"] < 1, "--lora_dropout must be in [0, 1)"),
        (not (cfg["fsdp"] and cfg["model_dtype"] == "bf16" and cfg["lora_r"] == 0),
         "--fsdp with --model_dtype bf16 full fine-tuning: keep --model_dtype fp32 (FSDP shards the fp32 "
         "master weights; pass --dtype bf16 for bf16 compute)"),
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
        (cfg["kl_all_weight"] >= 0 and cfg["head_mse_min"] >= 0, "--kl_all_weight and --head_mse_min must be >= 0"),
        (cfg["free_kl_weight"] >= 0, f"--free_kl_weight {cfg['free_kl_weight']}: must be >= 0"),
        (cfg["other_kl_weight"] >= 0, f"--other_kl_weight {cfg['other_kl_weight']}: must be >= 0"),
        (cfg["iv_norm_ratio"] >= 0, f"--iv_norm_ratio {cfg['iv_norm_ratio']}: must be >= 0"),
        (all(cfg[k] is None or cfg[k] >= 1 for k in ("iv_n_clean", "iv_n_corrupt", "iv_top_k")),
         "--iv_n_clean, --iv_n_corrupt and --iv_top_k must be >= 1"),
        (cfg["lora_alpha"] > 0, f"--lora_alpha {cfg['lora_alpha']}: must be > 0 (at 0 the adapters change nothing)"),
        (betas_in_range(cfg["betas"]), f"--betas {cfg['betas']}: expected two numbers in [0, 1), e.g. 0.9,0.999"),
        (cfg["max_len"] <= MAX_LEN, f"--max_len {cfg['max_len']}: must be <= {MAX_LEN} (the model's context is "
                                    f"checked too, once its config is read)"),
        (cfg["stage0_cache"] is None or not inside(cfg["stage0_cache"], cfg["out_dir"]),
         f"--stage0_cache {cfg['stage0_cache']}: must be outside --out_dir (a run folder holds only the "
         f"run's own files, or it cannot be resumed)"),
        (not spelled_in_both(cfg["tasks"], cfg["general"]), f"task(s) {', '.join(spelled_in_both(cfg['tasks'], cfg['general']))} "
         f"in both --tasks and --general: the general suite must be tasks the run never trains on"),
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


def lora_spec(cfg: dict) -> lora.LoraSpec | None:
    """The --lora_* flags as the library takes them; None for full fine-tuning (--lora_r 0)."""
    if cfg["lora_r"] == 0:
        return None
    return lora.LoraSpec(cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], tuple(cfg["lora_targets"].split(",")),
                         cfg["lora_merge"])


def check_launch(cfg: dict, world: int):
    """What can only be checked once the number of processes is known, and that out_dir is writable.
    --micro_batch's default ("the largest divisor <= 8 of the batch per rank") is resolved here."""
    if cfg["fsdp"] and world == 1:
        raise TrainError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
    if cfg["batch_size"] % world:
        raise TrainError(f"--batch_size {cfg['batch_size']} must be a multiple of the {world} processes")
    if cfg["micro_batch"] is None:       # derived from the batch the user asked for, so never the one at fault
        per_rank = cfg["batch_size"] // world
        cfg["micro_batch"] = max(m for m in range(1, min(8, per_rank) + 1) if per_rank % m == 0)
    if cfg["batch_size"] % (cfg["micro_batch"] * world):
        # every rank must run the same number of micro-batches per step, or the collectives hang
        raise TrainError(f"--batch_size {cfg['batch_size']} must be a multiple of --micro_batch "
                         f"{cfg['micro_batch']} x {world} process(es)")
    try:
        check_writable(cfg["out_dir"])
    except OSError as e:
        raise TrainError(f"--out_dir {cfg['out_dir']}: {e}") from None


# ---- helpers of check_flags' checks ----------------------------------------------------------

MAX_LEN = 1 << 17     # --max_len above every context this code loads (128K): a typo, not a setting


def betas_in_range(text: str) -> bool:
    """--betas: two finite numbers in [0, 1) (AdamW's own check comes only after stage 0)."""
    try:
        betas = [float(x) for x in str(text).split(",")]
    except ValueError:
        return False
    return len(betas) == 2 and all(0 <= b < 1 for b in betas)      # NaN fails every comparison


def spelled_in_both(tasks: str | None, general: str | None) -> list[str]:
    """Entries given in both --tasks and --general, as spelled (loaded tasks are compared by name and
    content in tasks.check_never_trained_on)."""
    def entries(spec):
        return {x.strip() for x in (spec or "").split(",") if x.strip()}
    return sorted(entries(tasks) & entries(general))


def inside(path: str, folder: str) -> bool:
    """Whether `path` is in `folder` or below it (paths as given, made absolute; no file is read)."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder
