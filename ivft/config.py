"""train.py's flags after parsing: the defaults that depend on the presets (--guided, --quick),
every value checked with a message naming the flag, and the few facts derived from them."""
from __future__ import annotations

import argparse
import math
import os

from ivft import lora
from ivft.runtime import TrainError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # "(default: None)" says nothing for flags whose default depends on --guided/--quick: their help
    # text spells the defaults out instead
    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# defaults that depend on the presets: (plain, --guided) and (normal, --quick)
GUIDED_DEFAULTS = {"iv_alpha0": (0.0, 1.0), "kl_weight": (0.0, 1.0), "kl_iv": (False, True)}
# Budget of the defaults: 4 tasks x 40 steps of 8, 5 stage evaluations, the 4 IVs
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


def check_launch(cfg: dict, world: int):
    """What can only be checked once the number of processes is known, and that out_dir is writable."""
    from ivft.files import check_writable
    if cfg["fsdp"] and world == 1:
        raise TrainError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
    if cfg["batch_size"] % (cfg["micro_batch"] * world):
        # every rank must run the same number of micro-batches per step, or the collectives hang
        raise TrainError(f"--batch_size {cfg['batch_size']} must be a multiple of --micro_batch "
                         f"{cfg['micro_batch']} x {world} process(es)")
    try:
        check_writable(cfg["out_dir"])
    except OSError as e:
        raise TrainError(f"--out_dir {cfg['out_dir']}: {e}") from None
