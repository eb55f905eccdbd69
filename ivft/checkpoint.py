"""Checkpoints and resuming. out_dir/stage-j = the model after task j; out_dir/last = a mid-task
checkpoint (--save_every, Ctrl-C, SIGTERM). Each is an HF directory (written by load.save_hf,
atomically) holding the fine-tuned weights (LoRA adapters merged into the export) that
transformers opens as it is, plus train_state.pt (optimizer, step, RNG of every rank, results so
far), train_config.json and, with LoRA, the current adapters in PEFT layout in the subfolder
adapter/. Not beside the merged weights: transformers, with peft installed, applies an adapter it finds
there on top of weights that already hold it. `PeftModel.from_pretrained(base, "<ckpt>/adapter")` opens
it on its base (named in adapter/adapter_config.json: the original model, or after a merge the previous
stage's checkpoint). The LoRA base is never stored twice: the finished tasks' adapters
(lora.finish_task) are kept in train_state.pt. (Which model is the KL's frozen reference is method:
ivft/reference.py.)

The functions take what they use: a RunFiles record (out_dir, the settings to store) and plain values.
"""
from __future__ import annotations

import copy
import io
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save as st_save

from ivft import lora
from ivft.config import RESUME_FREE, RUN_START_FILES
from ivft.dist import barrier, full_state_dict, gather_objects
from ivft.errors import LoadError, TrainError
from ivft.files import clean_leftovers, leftover_target
from ivft.ivfile import check_outputs, config_hash, task_fingerprint, weight_fingerprint
from ivft.load import check_context, load_hf_dir, load_model, read_config_only, read_safetensors, save_hf
from ivft.runtime import write_json
from ivft.tasks import TaskError, check_never_trained_on, unspellable_note
from model import Transformer


ADAPTER_DIR = "adapter"   # a checkpoint's LoRA adapters, in PEFT's layout


@dataclass
class RunFiles:
    """What checkpointing needs to know about a run."""
    out_dir: Path
    settings: dict                    # the resolved flags: written as train_config.json, compared on --resume
    model_id: str | None = None       # the base model (--model), named in the LoRA adapter config
    fsdp: bool = False                # sharded: state dicts are gathered from every rank
    lora: lora.LoraSpec | None = None  # the adapters of the run, None for full fine-tuning
    inputs: dict | None = None        # input_fingerprints: stored in every checkpoint, compared on --resume
    finish_marker: bool = False       # the run writes mark_finished last: its stage states say so (find_resume)


class _Export:
    """What save_hf needs from a model (config + state_dict), for a state dict we built ourselves."""

    def __init__(self, config, sd):
        self.config, self._sd = config, sd

    def state_dict(self):
        return self._sd


def save_checkpoint(path: Path, model: Transformer, tok, run: RunFiles, state: dict, sd: dict | None = None):
    """sd: the full state dict when the model is sharded (FSDP), gathered by the caller on all ranks."""
    sd = model.state_dict() if sd is None else sd
    frozen = lora.frozen_state_dict(sd)
    if frozen:   # the finished tasks' adapters: the merged weights cannot give back the exact base
        state = {**state, "lora_frozen": frozen}
    buf = io.BytesIO()
    torch.save(state, buf)
    extra = {"train_state.pt": buf.getvalue(), "train_config.json": run.settings}
    if run.inputs is not None:
        extra[INPUTS_FILE] = run.inputs
    if lora.lora_layers(model):
        sd, adapters = lora.split_state_dict(sd, lora.scale_of(model))   # every adapter merged in
        if adapters:    # a current adapter; between tasks of the merge policy only merged weights
            # the adapters' base: the original model, or after a merge the last stage's checkpoint
            j = state["stage_done"]
            merged = run.lora is not None and run.lora.merge and j > 0
            base = str(run.out_dir / f"stage-{j}") if merged else run.model_id
            adapters, config = adapters_for_peft(adapters, lora.adapter_config(model, base), model.config)
            extra[ADAPTER_DIR + "/adapter_model.safetensors"] = st_save(adapters, metadata={"format": "pt"})
            extra[ADAPTER_DIR + "/adapter_config.json"] = config
    try:
        save_hf(_Export(model.config, sd), tok, path, extra_files=extra)
    except (OSError, SafetensorError) as e:   # a full disk's error names no file: say which failed
        why = getattr(e, "strerror", None) or e   # safetensors raises its own error type, not OSError
        raise TrainError(f"{path}: cannot write the checkpoint ({why}); the previous checkpoint is kept") from None


# GPT-2's HF module names of our LoRA targets; q_proj, k_proj and v_proj are one Conv1D there (attn.c_attn)
GPT2_LORA = {"o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}
QKV = ("q_proj", "k_proj", "v_proj")


def adapters_for_peft(adapters: dict, config: dict, mc) -> tuple[dict, dict]:
    """Our adapters (PEFT names over our module names, from lora.split_state_dict) and their
    adapter_config.json -> what peft applies to the HF model of this family. Llama-family module
    names are HF's already. GPT-2 fuses q, k and v into one layer (attn.c_attn, output [q; k; v]):
    n adapters of rank r there become one of rank n*r with the A's stacked and the B's placed
    block-diagonally, which adds exactly the same to each of q, k, v (alpha n*alpha keeps alpha/r)."""
    if mc.architecture != "gpt2":
        return adapters, config
    C, r, targets = mc.hidden_size, config["r"], config["target_modules"]
    qkv = [t for t in QKV if t in targets]
    out = {}
    for i in range(mc.num_hidden_layers):
        ours, hf = f"base_model.model.model.layers.{i}.", f"base_model.model.transformer.h.{i}."
        if qkv:
            A = torch.cat([adapters[f"{ours}self_attn.{t}.lora_A.weight"] for t in qkv])   # (n*r, C)
            B = A.new_zeros(3 * C, len(qkv) * r)                                           # (3C, n*r)
            for s, t in enumerate(qkv):
                j = QKV.index(t)
                B[j * C:(j + 1) * C, s * r:(s + 1) * r] = adapters[f"{ours}self_attn.{t}.lora_B.weight"]
            out[hf + "attn.c_attn.lora_A.weight"], out[hf + "attn.c_attn.lora_B.weight"] = A, B
        for t, name in GPT2_LORA.items():
            if t in targets:
                part = "self_attn" if t == "o_proj" else "mlp"
                for ab in "AB":
                    out[f"{hf}{name}.lora_{ab}.weight"] = adapters[f"{ours}{part}.{t}.lora_{ab}.weight"]
    config = {**config, "fan_in_fan_out": True,   # GPT-2's Conv1D stores weights [in, out]
              "target_modules": ["attn.c_attn"] * bool(qkv) + [GPT2_LORA[t] for t in GPT2_LORA if t in targets]}
    if qkv:
        config.update(rank_pattern={"c_attn": len(qkv) * r}, alpha_pattern={"c_attn": len(qkv) * config["lora_alpha"]})
    return out, config


def adapters_from_peft(sd: dict, mc, targets, r: int) -> dict:
    """The inverse of adapters_for_peft: a checkpoint's adapter file -> our adapters (for resuming)."""
    if mc.architecture != "gpt2" or not any(k.startswith("base_model.model.transformer.") for k in sd):
        return sd
    C, out = mc.hidden_size, {}
    qkv = [t for t in QKV if t in targets]
    for i in range(mc.num_hidden_layers):
        ours, hf = f"base_model.model.model.layers.{i}.", f"base_model.model.transformer.h.{i}."
        for s, t in enumerate(qkv):
            j = QKV.index(t)
            A, B = sd[hf + "attn.c_attn.lora_A.weight"], sd[hf + "attn.c_attn.lora_B.weight"]   # (n*r, C), (3C, n*r)
            out[f"{ours}self_attn.{t}.lora_A.weight"] = A[s * r:(s + 1) * r]
            out[f"{ours}self_attn.{t}.lora_B.weight"] = B[j * C:(j + 1) * C, s * r:(s + 1) * r]
        for t, name in GPT2_LORA.items():
            if t in targets:
                part = "self_attn" if t == "o_proj" else "mlp"
                for ab in "AB":
                    out[f"{ours}{part}.{t}.lora_{ab}.weight"] = sd[f"{hf}{name}.lora_{ab}.weight"]
    return out


def read_state(path: Path) -> dict:
    """A checkpoint's training state, checked to hold what resuming reads (check_state)."""
    try:
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises many kinds of errors
        raise TrainError(f"{path / 'train_state.pt'}: corrupt or unreadable training state "
                         f"({type(e).__name__})") from None
    check_state(state, path / "train_state.pt")
    return state


def check_state(state, where) -> None:
    """The fields resuming reads, of the types save_mid_task / save_stage write: a state missing one
    is refused here, in one line, instead of a KeyError halfway through restoring."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not isinstance(state, dict):
        raise TrainError(f"{where}: not a training state (got {type(state).__name__})")
    for key, ok, what in (("stage_done", whole, "a whole number >= 0"), ("step", whole, "a whole number >= 0"),
                          ("stages", lambda v: isinstance(v, list), "a list"),
                          ("rng", lambda v: isinstance(v, list) and v and all(isinstance(r, dict) for r in v),
                           "a non-empty list of RNG states"),
                          ("training", lambda v: isinstance(v, list), "a list")):
        if key == "training" and key not in state:
            continue       # older states
        if key not in state or not ok(state[key]):
            raise TrainError(f"{where}: training state field {key!r} is "
                             f"{'missing' if key not in state else 'not ' + what}")
    if state["step"] > 0 and not isinstance(state.get("optimizer"), dict):
        raise TrainError(f"{where}: a mid-task training state without its optimizer state")


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


def check_resume_config(ckpt: Path, settings: dict):
    """The flags of a resumed run must be the checkpoint's (except RESUME_FREE); a change of the code
    itself (the "code" record: git commit + hash of uncommitted changes) is only warned about."""
    try:
        saved = json.loads((ckpt / "train_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{ckpt / 'train_config.json'}: unreadable ({type(e).__name__})") from None
    diff = sorted(k for k in set(saved) | set(settings) if k not in RESUME_FREE and saved.get(k) != settings.get(k))
    if diff:
        k = diff[0]
        raise TrainError(f"--resume: the checkpoint was made with {k}={saved.get(k)!r}, now {k}={settings.get(k)!r} "
                         f"({len(diff)} setting(s) differ: {', '.join(diff)}); rerun with the same flags")
    if "code" in saved and saved.get("code") != settings.get("code"):
        print(f"warning: --resume: the code changed since {ckpt} was written (then {saved.get('code')}, now "
              f"{settings.get('code')}): the resumed run is not one version's", file=sys.stderr)


INPUTS_FILE = "run_inputs.json"     # in a checkpoint: the fingerprints of the data and base model it came from


def input_fingerprints(train_tasks, general, model) -> dict:
    """What a run's numbers depend on besides its flags, by content: every task's data
    (ivfile.task_fingerprint) and the base model's weights and config. Taken from the model as
    loaded, before a resumed run's weights go in."""
    return {"tasks": {t.name: task_fingerprint(t) for t in train_tasks},
            "general": {t.name: task_fingerprint(t) for t in general},
            "weights": weight_fingerprint(model), "config": config_hash(model)}


def check_resume_inputs(ckpt: Path, inputs: dict, accept: bool = False):
    """A resumed run must see the data and base model its checkpoint was made from: the same flags
    over edited task files or replaced weights at the same path would splice two runs. One line
    naming what changed (accept: a warning instead, --accept_changed_inputs). A checkpoint without the
    record (older code) is resumed with a warning."""
    path = ckpt / INPUTS_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"warning: --resume: {ckpt} records no fingerprints of its task data and base model "
              f"(older code): their changes cannot be checked", file=sys.stderr)
        return
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise TrainError(f"{path}: not a record of fingerprints (a JSON object)")
    changed = []
    for group, what in (("tasks", "training task"), ("general", "general task")):
        then, now = saved.get(group) or {}, inputs.get(group) or {}
        changed += [f"the data of {what} {n!r}" for n in now if n in then and then[n] != now[n]]
    if saved.get("weights") != inputs.get("weights") or saved.get("config") != inputs.get("config"):
        changed.append("the base model's " + ("weights" if saved.get("config") == inputs.get("config") else "config"))
    if changed and accept:
        print(f"warning: --resume: {', '.join(changed)} changed since {ckpt} was written; continuing "
              f"(--accept_changed_inputs): the run is a splice of two", file=sys.stderr)
    elif changed:
        raise TrainError(f"--resume: {', '.join(changed)} changed since {ckpt} was written; resume with "
                         f"the same data and model, start afresh with --overwrite, or pass "
                         f"--accept_changed_inputs to continue anyway")


def restore_model(model, ckpt: Path, state: dict, spec: lora.LoraSpec | None, out_dir: Path):
    """Put the weights of checkpoint `ckpt` into `model` (which holds the original weights).
    Full fine-tuning: the checkpoint's weights. LoRA: the original weights stay (the references are
    views of them, lora.reference_view); the finished tasks' adapters come from the training state
    (merge policy) or, as the "previous" snapshot, from the last stage's adapter file (one adapter
    for all tasks); the current adapter from the checkpoint's adapter file. The checkpoint's own
    model.safetensors has the adapters merged in, and merging rounds, so it cannot give back the base."""
    j, step = state["stage_done"], state["step"]
    if spec is None:
        load_weights_into(model, ckpt)
        return
    lora.add_lora(model, spec.r, spec.alpha, spec.dropout, list(spec.targets))
    try:
        if j > 0 and spec.merge:
            if "lora_frozen" not in state:
                raise TrainError(f"{ckpt}: written before finished adapters were kept apart (no "
                                 f"lora_frozen in train_state.pt); start the run afresh with --overwrite")
            lora.load_frozen(model, state["lora_frozen"], stack=True)
        elif j > 0:
            lora.load_frozen(model, peft_as_frozen(out_dir / f"stage-{j}", model.config, spec), stack=False)
        if spec.merge and step == 0:
            lora.drop_current(model)     # between tasks: the next task draws its fresh adapters
            return
        lora.load_adapter_state_dict(model, read_adapters(ckpt, model.config, spec))
    except (LoadError, ValueError, KeyError) as e:
        raise TrainError(f"{ckpt}: {e}") from None


def read_adapters(ckpt: Path, config, spec: lora.LoraSpec) -> dict:
    """A checkpoint's current adapters in PEFT names, as the model holds them (adapters_from_peft)."""
    # checkpoints written before the adapters moved into adapter/ hold them at the top
    folder = ckpt / ADAPTER_DIR if (ckpt / ADAPTER_DIR).is_dir() else ckpt
    return adapters_from_peft(read_safetensors(folder / "adapter_model.safetensors"), config, spec.targets, spec.r)


def peft_as_frozen(stage: Path, config, spec: lora.LoraSpec) -> dict:
    """A stage's adapter file (PEFT names) as lora.load_frozen reads a snapshot."""
    sd = read_adapters(stage, config, spec)
    prefix, out = "base_model.model.", {}
    for k, v in sd.items():
        module, ab, _ = k[len(prefix):].rsplit(".", 2)         # <module>.lora_A.weight
        out[f"{module}.{ab}_done"] = v
    return out


# ---------------------------------------------------------------------------------------------
# Starting or resuming a run in out_dir

def load_base_model(model_id: str | None, model_dtype: str, device, lora_targets=None, chat_template=None):
    """The model a run starts from (--model, --model_dtype "fp32" or "bf16") with its tokenizer, whose
    chat template a --chat_template file replaces; with LoRA, its targets checked against the family's
    linear layers (before any evaluation runs)."""
    try:
        dtype = torch.bfloat16 if model_dtype == "bf16" else torch.float32
        model, tok = load_model(model_id, dtype=dtype, device=device, chat_template=chat_template)
        if lora_targets is not None:
            lora.check_targets(model, lora_targets)
    except (LoadError, ValueError) as e:
        raise TrainError(str(e)) from None
    if tok is None:
        raise TrainError(f"{model_id}: no tokenizer files next to the weights")
    # weights with NaN / Inf would only show as "loss is nan ... try a lower --lr" after stage 0
    bad = next((name for name, t in model.state_dict().items()
                if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise TrainError(f"{model_id or 'the embedded model'}: tensor {bad} holds NaN or Inf values")
    return model, tok


def check_before_load(model_id: str | None, max_len: int, train_tasks: list, general: list,
                      iv_dir: str | None = None) -> None:
    """What can be refused before the model loads (one TrainError line each): a task both trained on
    and in the general suite, a --max_len past the model's positions (its config.json alone is read),
    an --iv_dir (given when the run uses IVs) that cannot take the IV files."""
    try:
        check_never_trained_on(train_tasks, general)
        mc = read_config_only(model_id)
        if mc is not None:
            check_context(max_len, mc)
    except (TaskError, LoadError) as e:
        raise TrainError(str(e)) from None
    if iv_dir is not None:
        check_outputs(Path(iv_dir), True, "--iv_dir")


def check_after_load(run: RunFiles, model, tok, max_len: int, train_tasks: list, general: list,
                     resumed_from: Path | None, accept_changes: bool = False) -> None:
    """Once the base model is loaded, before a resumed run's weights go in: the sequence length
    against its positions (a GGUF's config comes with its weights), the fingerprints of the data and
    weights kept in run.inputs (and checked against the checkpoint resumed from), and a warning per
    task with characters the tokenizer cannot spell."""
    try:
        check_context(max_len, model.config)
    except LoadError as e:
        raise TrainError(str(e)) from None
    run.inputs = input_fingerprints(train_tasks, general, model)
    if resumed_from is not None:
        check_resume_inputs(resumed_from, run.inputs, accept_changes)
    for task in [*train_tasks, *general]:
        if note := unspellable_note(task, tok):
            print(note, file=sys.stderr)


def is_run_base(name: str) -> bool:
    """Whether out_dir/name is something train.py writes: its start files, stage-j/ and last/
    checkpoints, summary.png."""
    return name in RUN_START_FILES | {"last", "summary.png", FINISHED} or re.fullmatch(r"stage-\d+", name) is not None


def is_run_file(name: str) -> bool:
    """is_run_base, or a temporary / swapped-out copy of one of those named exactly as ivft/files.py
    names them (with a writer's pid and start token): `.results.json.tmp-mine` is not a run's."""
    return is_run_base(leftover_target(name) or name)


def started_here(out_dir: Path, entries: set) -> bool:
    """Whether a folder was begun by train.py: empty, or its train_config.json (the first file a run
    writes, after run.lock) reads as a run's flags. Files named like a run's (results.json, log.txt,
    even stage-1/) without it are not proof: --overwrite never deletes on a name alone."""
    if not entries:
        return True
    try:
        saved = json.loads((out_dir / "train_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"preset", "tasks", "out_dir"} <= set(saved)


# ---------------------------------------------------------------------------------------------
# "Finished" is a marker written last, atomically, after everything a run produces (results.json,
# summary.png): a run killed anywhere before it is not finished, and --resume completes it.

FINISHED = "finished"


def mark_finished(out_dir: Path, task_names: list) -> None:
    """The last write of a run (train.py, after results.json and summary.png)."""
    write_json(Path(out_dir) / FINISHED, {"finished": True, "tasks": list(task_names)})


def read_finished(out_dir: Path) -> dict | None:
    """The marker of a finished run, or None (absent, or not one this code writes)."""
    try:
        marker = json.loads((Path(out_dir) / FINISHED).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("finished") is True else None


def read_results(out_dir: Path) -> dict | None:
    """out_dir/results.json as a dict, None when absent; one line naming it when unreadable."""
    path = Path(out_dir) / "results.json"
    if not path.exists():
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: unreadable ({type(e).__name__}); nothing changed (move it aside to go "
                         f"on: the checkpoints hold the run's stages)") from None
    if not isinstance(res, dict) or not isinstance(res.get("stages", []), list) \
            or not isinstance(res.get("training", []), list):
        raise TrainError(f"{path}: not a run's results (a JSON object with lists 'stages' and 'training')")
    return res


def results_complete(res: dict | None, state: dict, n_tasks: int) -> bool:
    """A run of code that wrote no marker counts as finished only when its results.json holds what
    the end of the run writes: every task's training entry and every stage's report. (A kill between
    the last checkpoint and the final write leaves the last task's entry out.) A run whose stage states
    say it writes the marker (RunFiles.finish_marker) is finished by the marker alone."""
    return (res is not None and len(res.get("training", [])) == n_tasks
            and len(res.get("stages", [])) == len(state.get("stages", [])))


def trained_before(out_dir: Path) -> bool:
    """Whether results.json records any trained stage (or cannot be read): then the folder is not
    what a start that died early leaves, even without checkpoints (a user may delete those)."""
    try:
        res = read_results(out_dir)
    except TrainError:
        return True
    return res is not None and (len(res.get("training", [])) > 0 or len(res.get("stages", [])) > 1)


def run_entries(out_dir: Path) -> set:
    """The names in out_dir but run.lock (this run's own lock: train.py holds it while it runs)."""
    return {p.name for p in out_dir.iterdir()} - {"run.lock"} if out_dir.is_dir() else set()


def find_resume(run: RunFiles, n_tasks: int, resume: bool, overwrite: bool, main: bool, d) -> dict:
    """Decide, before anything is written, where the run starts. -> {"ckpt": Path or None,
    "state": its training state or None, "early_death": out_dir holds only what a start that died
    wrote, "finished": results of a finished run to return untouched, else None}. Raises TrainError
    for an out_dir that holds another run (without --resume / --overwrite) or no usable checkpoint."""
    out_dir = run.out_dir
    entries = run_entries(out_dir)
    # a folder holding anything a run does not write is someone else's: never taken over, not even
    # with --overwrite (which replaces only a run's own files), and nothing in it is touched
    ours = started_here(out_dir, entries)
    own = {"wandb"} if run.settings.get("wandb") else set()     # wandb.init(dir=out_dir) writes out_dir/wandb
    foreign = sorted(n for n in entries if not (is_run_file(n) or n in own) or not ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise TrainError(f"{out_dir} holds files that are not a run's ({shown}): choose another --out_dir "
                         f"(a run never takes over such a folder, with or without --overwrite)")
    # only now, in a folder known to be a run's, and only the run's own names: before looking for
    # checkpoints, since a swap cut short may have to be moved back
    for line in clean_leftovers(out_dir, ours=is_run_base) if main else []:
        print(line, file=sys.stderr)
    barrier(d)
    entries = run_entries(out_dir)
    marker = read_finished(out_dir)
    early = bool(entries) and entries - own <= RUN_START_FILES and marker is None and not trained_before(out_dir)
    out = {"ckpt": None, "state": None, "finished": None, "early_death": early}
    if not resume:
        if entries and not early and not overwrite:
            shown = ", ".join(sorted(entries)[:6])
            raise TrainError(f"{out_dir} already holds a run ({shown}): pass --resume to continue it or "
                             f"--overwrite to start it afresh")
        return out
    if marker is not None:
        check_resume_config(out_dir, run.settings)
        return {**out, "finished": finished_results(run, n_tasks, None)}
    # training states are read (they hold the optimizer: large) only when resuming
    notes = []
    ckpt = newest_checkpoint(out_dir, notes) if out_dir.is_dir() else None
    if ckpt is None and entries and not early:      # one line: the note of the last one skipped is in it
        raise TrainError(f"--resume: no readable checkpoint in {out_dir}" + (f" ({notes[-1]})" if notes else ""))
    for line in notes:
        print(line, file=sys.stderr)
    if ckpt is None:
        print(f"--resume: no checkpoint in {out_dir} yet: starting from the beginning", file=sys.stderr)
        return out
    check_resume_config(ckpt, run.settings)
    state = read_state(ckpt)
    if state["stage_done"] > n_tasks or (state["stage_done"] == n_tasks and state["step"] > 0):
        raise TrainError(f"{ckpt / 'train_state.pt'}: records {state['stage_done']} task(s) done (step "
                         f"{state['step']}) of a run of {n_tasks}: not a checkpoint of this run")
    out.update(ckpt=ckpt, state=state)
    # a run of code that wrote no marker: finished when its results.json holds what its end writes
    if state["stage_done"] == n_tasks and state["step"] == 0 and not state.get("finish_marker") \
            and results_complete(read_results(out_dir), state, n_tasks):
        out["finished"] = finished_results(run, n_tasks, state)
    return out


def finished_results(run: RunFiles, n_tasks: int, state: dict | None) -> dict:
    """The results of a finished run, returned untouched (nothing in out_dir changes)."""
    res = read_results(run.out_dir)
    print(f"{run.out_dir}: this run is finished ({n_tasks} tasks); nothing to resume, nothing changed. "
          f"Results: {run.out_dir / 'results.json'}", file=sys.stderr)
    if res is None:
        return {"config": run.settings, "stages": state["stages"] if state else [], "metrics": {}}
    return res


def start_out_dir(run: RunFiles, clear: bool, d):
    """The first write of a run: clear what an earlier run wrote (--overwrite, or a start that died
    early), then the resolved flags as out_dir/train_config.json."""
    out_dir = run.out_dir
    if d.main:
        if clear and out_dir.is_dir():
            # the marker first: a clearing cut short must not leave a folder that reads as finished
            (out_dir / FINISHED).unlink(missing_ok=True)
            # what a run writes (is_run_file), but the lock this run holds and the flags it rewrites now
            for p in [p for p in out_dir.iterdir() if is_run_file(p.name)
                      and p.name not in ("run.lock", "train_config.json")]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "train_config.json", run.settings)
    barrier(d)


def load_optimizer(opt, state: dict, fsdp: bool, module):
    try:
        if fsdp:
            # lazily: torch.distributed.checkpoint is slow to import and only FSDP runs need it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(module, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise TrainError(f"optimizer state does not fit the model ({e})") from None


def check_lock(out_dir: Path) -> None:
    """Before a checkpoint is written: out_dir/run.lock must still be this process's. Deleting out_dir
    under a running train.py deletes the lock with it, and a second writer could then start there:
    the first one stops instead of writing into a folder it no longer holds."""
    try:
        holder = (out_dir / "run.lock").read_text().split()
    except OSError:
        holder = []
    if holder[:1] != [str(os.getpid())]:
        raise TrainError(f"{out_dir / 'run.lock'} is gone or another process's: {out_dir} was removed or "
                         f"replaced while this run was writing to it; stopped without saving")


def save_mid_task(run: RunFiles, model, tok, opt, module, stage_done: int, step: int, rng: dict, stages: list, d,
                  training: list | None = None, term_log: list | None = None):
    """The resumable checkpoint out_dir/last: weights, optimizer, step, RNG of every rank, results.
    Under FSDP parameters and optimizer state are gathered to full tensors (every rank takes part)."""
    sd = None
    if run.fsdp:
        # lazily: torch.distributed.checkpoint is slow to import and only FSDP runs need it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        sd = full_state_dict(model, True)
        optim = get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optim = opt.state_dict()
    state = {"stage_done": stage_done, "step": step, "optimizer": optim, "rng": gather_objects(rng, d),
             "stages": stages, "training": training or [], "term_log": term_log or [], "version": 1}
    if d.main:
        check_lock(run.out_dir)
        save_checkpoint(run.out_dir / "last", model, tok, run, state, sd)
    barrier(d)


def save_stage(run: RunFiles, model, tok, stage_done: int, stages: list, task_names: list, d,
               training: list | None = None) -> Path:
    """out_dir/stage-j after task j (no optimizer: the next task starts a fresh one). The mid-task
    checkpoint of this task is then behind and is removed, so that resume never picks it."""
    state = {"stage_done": stage_done, "step": 0, "rng": gather_objects(rng_state(), d), "stages": stages,
             "training": training or [], "tasks": task_names, "version": 1, "finish_marker": run.finish_marker}
    sd = full_state_dict(model, True) if run.fsdp else None
    path = run.out_dir / f"stage-{stage_done}"
    if d.main:
        check_lock(run.out_dir)
        save_checkpoint(path, model, tok, run, state, sd)
        shutil.rmtree(run.out_dir / "last", ignore_errors=True)
    return path
