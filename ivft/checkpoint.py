"""Checkpoints and resuming. out_dir/stage-j = the model after task j; out_dir/last = a mid-task
checkpoint (--save_every, Ctrl-C, SIGTERM). Each is an HF directory (written by load.save_hf,
atomically) holding the fine-tuned weights (LoRA adapters merged into the export) that
transformers opens as it is, plus train_state.pt (optimizer, step, RNG of every rank, results so
far), train_config.json and, with LoRA, the adapters in PEFT layout. The LoRA base is never stored
twice: it is the original model or the previous stage's checkpoint. Also here: the frozen
reference model of the KL term, which is one of these checkpoints or the original.
"""
from __future__ import annotations

import copy
import io
import json
import random
import sys
from pathlib import Path

import torch

from ivft import lora
from ivft.config import RESUME_FREE, RUN_START_FILES, needs_reference
from ivft.dist import barrier, full_state_dict, gather_objects
from ivft.files import clean_leftovers
from ivft.load import LoadError, load_hf_dir, load_model, read_safetensors, save_hf
from ivft.runtime import TrainError, write_json
from model import Transformer


class _Export:
    """What save_hf needs from a model (config + state_dict), for a state dict we built ourselves."""

    def __init__(self, config, sd):
        self.config, self._sd = config, sd

    def state_dict(self):
        return self._sd


def save_checkpoint(path: Path, model: Transformer, tok, cfg: dict, state: dict, sd: dict | None = None):
    """sd: the full state dict when the model is sharded (FSDP), gathered by the caller on all ranks."""
    from safetensors.torch import save as st_save   # lazily: only writers need it
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


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(state: dict, rank: int = 0):
    """The RNG of this rank as a training state saved it (a run resumed on fewer ranks takes the last)."""
    st = state["rng"][min(rank, len(state["rng"]) - 1)]
    torch.set_rng_state(st["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(st["python"]), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


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
    lora.add_lora(model, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"].split(","))
    try:
        lora.load_adapter_state_dict(model, read_safetensors(ckpt / "adapter_model.safetensors"))
    except (LoadError, ValueError) as e:
        raise TrainError(f"{ckpt}: {e}") from None


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




# ---------------------------------------------------------------------------------------------
# Starting or resuming a run in out_dir

def load_base_model(cfg: dict, device):
    """The model a run starts from (--model, --model_dtype) with its tokenizer, checked."""
    try:
        model, tok = load_model(cfg["model"], dtype=torch.bfloat16 if cfg["model_dtype"] == "bf16" else torch.float32,
                                device=device)
    except LoadError as e:
        raise TrainError(str(e)) from None
    if tok is None:
        raise TrainError(f"{cfg['model']}: no tokenizer files next to the weights")
    if cfg["iv_layer"] is not None and not 0 <= cfg["iv_layer"] < model.n_layers:
        raise TrainError(f"--iv_layer {cfg['iv_layer']} is out of range: the model has layers 0..{model.n_layers - 1}")
    return model, tok


def find_resume(cfg: dict, out_dir: Path, n_tasks: int, main: bool, d) -> dict:
    """Decide, before anything is written, where the run starts. -> {"ckpt": Path or None,
    "state": its training state or None, "early_death": out_dir holds only what a start that died
    wrote, "finished": results of a finished run to return untouched, else None}. Raises TrainError
    for an out_dir that holds another run (without --resume / --overwrite) or no usable checkpoint."""
    notes = clean_leftovers(out_dir) if main else []    # before looking for checkpoints: a swap
    barrier(d)                                          # cut short may have to be moved back
    entries = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    out = {"ckpt": None, "state": None, "finished": None,
           "early_death": bool(entries) and entries <= RUN_START_FILES}
    # training states are read (they hold the optimizer: large) only when resuming
    ckpt = newest_checkpoint(out_dir, notes) if cfg["resume"] and out_dir.is_dir() else None
    for line in notes:
        print(line, file=sys.stderr)
    if not cfg["resume"]:
        if entries and not out["early_death"] and not cfg["overwrite"]:
            raise TrainError(f"{out_dir} already holds a run: pass --resume to continue it or --overwrite")
        return out
    if ckpt is None and entries and not out["early_death"]:
        raise TrainError(f"--resume: no readable checkpoint in {out_dir}" + (f" ({notes[-1]})" if notes else ""))
    if ckpt is None:
        print(f"--resume: no checkpoint in {out_dir} yet: starting from the beginning", file=sys.stderr)
        return out
    check_resume_config(ckpt, cfg)
    state = read_state(ckpt)
    out.update(ckpt=ckpt, state=state)
    if state["stage_done"] == n_tasks and state["step"] == 0:
        # a finished run is left exactly as it is
        print(f"{out_dir}: this run is finished ({n_tasks} tasks); nothing to resume, nothing changed. "
              f"Results: {out_dir / 'results.json'}", file=sys.stderr)
        res = out_dir / "results.json"
        out["finished"] = json.loads(res.read_text()) if res.is_file() else {"config": cfg, "stages": state["stages"]}
    return out


def start_out_dir(out_dir: Path, cfg: dict, clear: bool, d):
    """The first write of a run: clear what an earlier run wrote (--overwrite, or a start that died
    early), then the resolved flags as out_dir/train_config.json."""
    import shutil
    if d.main:
        if clear:
            for p in [*out_dir.glob("stage-*"), out_dir / "last", out_dir / "results.json", out_dir / "log.txt"]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "train_config.json", cfg)
    barrier(d)


def load_optimizer(opt, state: dict, cfg: dict, module):
    try:
        if cfg["fsdp"]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(module, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise TrainError(f"optimizer state does not fit the model ({e})") from None


def save_mid_task(out_dir: Path, model, tok, cfg: dict, opt, module, stage_done: int, step: int, rng: dict,
                  stages: list, d):
    """The resumable checkpoint out_dir/last: weights, optimizer, step, RNG of every rank, results.
    Under FSDP parameters and optimizer state are gathered to full tensors (every rank takes part)."""
    sd = None
    if cfg["fsdp"]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        sd = full_state_dict(model, True)
        optim = get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optim = opt.state_dict()
    state = {"stage_done": stage_done, "step": step, "optimizer": optim, "rng": gather_objects(rng, d),
             "stages": stages, "version": 1}
    if d.main:
        save_checkpoint(out_dir / "last", model, tok, cfg, state, sd)
    barrier(d)


def save_stage(out_dir: Path, model, tok, cfg: dict, stage_done: int, stages: list, task_names: list, d) -> Path:
    """out_dir/stage-j after task j (no optimizer: the next task starts a fresh one). The mid-task
    checkpoint of this task is then behind and is removed, so that resume never picks it."""
    import shutil
    state = {"stage_done": stage_done, "step": 0, "rng": gather_objects(rng_state(), d), "stages": stages,
             "tasks": task_names, "version": 1}
    sd = full_state_dict(model, True) if cfg["fsdp"] else None
    path = out_dir / f"stage-{stage_done}"
    if d.main:
        save_checkpoint(path, model, tok, cfg, state, sd)
        shutil.rmtree(out_dir / "last", ignore_errors=True)
    return path
