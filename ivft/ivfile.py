"""IV files and their cache keys: the safetensors file extract_iv.py writes (the tensors, and the
metadata as one JSON string), reading it and loading it against a model, file names under
ivs/<model-tag>/, the fingerprints of config, weights and task data that decide whether a cached
IV may be reused, and extract_iv.py's output paths, checked before the work."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ivft.errors import ExtractError
from ivft.files import check_writable, clean_leftovers, write_atomic
from ivft.ivsettings import check_layer
from ivft.report import save_heatmap
from ivft.tasks import list_tasks

FORMAT_VERSION = 2    # 2: k-shot plain-text clean prompts, query-only corruption, dev-chosen layer/K


# ---------------------------------------------------------------------------------------------
# Names: ivs/<model_tag>/<iv_filename>

def model_tag(name_or_path) -> str:
    """The folder name of a model's IVs: the GGUF file's stem or the HF directory's name."""
    if name_or_path is None:
        return "SmolLM2-135M-Instruct"
    p = Path(name_or_path)
    if p.name in ("", ".", ".."):      # "--model ." or "..": the folder's own name, not a path step
        p = p.resolve()                # (which would put the IVs flat in, or outside, iv_dir)
    return (p.stem if p.suffix == ".gguf" else p.name) or "model"


def task_fingerprint(task) -> str:
    """A short hash of everything of a task that an IV or a score depends on: every field of every
    example (instruction, input, output, choices, knowledge prompt and answer), the fixed
    demonstrations, the split and the metric. An IV or stage-0 report cached for a task is reused only
    for the same content, and a task read from a file gets a cache name of its own (<name>-<hash>).
    The name, kind and description are labels, not content: they are keyed where they matter."""
    content = {"metric": task.metric,
               **{part: [dataclasses.asdict(ex) for ex in getattr(task, part)] for part in ("train", "test", "demos")}}
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]


def is_registered(task) -> bool:
    # a file task may carry a registry task's name: only the registry's own description makes it that task
    try:
        meta = list_tasks().get(task.name)
    except ValueError:
        return False
    return meta is not None and task.description == meta.get("description")


def iv_filename(task) -> str:
    """ivs/<model>/<this>: the registry name for the project's tasks, name + data hash for files."""
    return f"{task.name}.safetensors" if is_registered(task) else f"{task.name}-{task_fingerprint(task)}.safetensors"


# ---------------------------------------------------------------------------------------------
# Fingerprints and the metadata that decide reuse

# ModelConfig switches added after IV files were first written (Qwen3, Gemma-3, sliding windows), with
# the value every earlier model had: left out of the hash at that value, so older IV files still match
LATER_FIELDS = {"qk_norm": False, "norm_plus_one": False, "sandwich_norm": False, "scale_embeddings": False,
                "query_pre_attn_scalar": None, "final_logit_softcapping": None, "sliding_window": None,
                "rope_local_theta": None}


def config_hash(model) -> str:
    mc = dataclasses.asdict(model.config)
    mc = {k: v for k, v in mc.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
    if set(mc.get("layer_types") or ()) <= {"full_attention"}:
        mc.pop("layer_types", None)
    return hashlib.sha1(json.dumps(mc, sort_keys=True, default=str).encode()).hexdigest()[:12]


@torch.no_grad()
def weight_fingerprint(model) -> str:
    """A cheap hash of the weights (4,096 evenly spaced values per tensor): tells the original model
    from a fine-tuned one without hashing all parameters."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().flatten()
        n = min(4096, flat.numel())
        # integer arithmetic: a float linspace rounds past the end of a 28M-element tensor
        pick = torch.arange(n, dtype=torch.int64, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
        h.update(name.encode())
        h.update(flat[pick].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def iv_meta(model, task, key: dict, s, heads, info, model_id, universal=None) -> dict:
    """An IV file's metadata: the format, model and task fingerprints, the IV's layer / K / kind, the
    cache key (key: the settings as asked for) and the mediation's info. s: the Settings used."""
    mc = model.config
    return {"format": FORMAT_VERSION, "model": model_id, "config_hash": config_hash(model),
            "weights": weight_fingerprint(model), "n_layers": mc.num_hidden_layers,
            "n_heads": mc.num_attention_heads, "d_model": mc.hidden_size, "task": task.name,
            "task_hash": task_fingerprint(task), "heads": [list(h) for h in heads], "layer": s.layer,
            "top_k": s.top_k, "kind": s.kind, "settings": key, "universal": universal, **info}


def cache_matches(meta: dict, task, key: dict, model) -> bool:
    """Whether a cached IV's metadata says it was made from these very weights, the same task data
    and the same settings (key: Settings.key() of the resolved settings) in this file format."""
    return (meta.get("format") == FORMAT_VERSION and meta.get("task") == task.name
            and meta.get("task_hash") == task_fingerprint(task) and meta.get("settings") == key
            and meta.get("universal") is None and meta.get("config_hash") == config_hash(model)
            and meta.get("weights") == weight_fingerprint(model))


# ---------------------------------------------------------------------------------------------
# Files: safetensors with the tensors, the metadata as one JSON string

def save_iv(result: dict, path) -> Path:
    """Write through write_atomic (a reader never sees half a file), plus an AIE heatmap if
    matplotlib is installed."""
    path = Path(path)
    # what an extraction killed while writing here left (only this code's names, its dead writers')
    clean_leftovers(path.parent, ours=lambda name: name.endswith((".safetensors", ".png")))
    tensors = {k: result[k].detach().float().contiguous() for k in ("iv", "aie", "z_mean", "aie_task", "resid_diff")
               if k in result}
    metadata = {"format": "pt", "iv_meta": json.dumps(result["meta"])}
    # a full disk or a read-only iv_dir: one ExtractError naming the file (safetensors raises its own
    # SafetensorError, and an OSError's message alone is only an errno)
    written(path, write_atomic, path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    written(path.with_suffix(".png"), save_heatmap, result["aie"], result["heads"], path.with_suffix(".png"),
            f"AIE {result['meta']['task']} ({result['meta']['model']})")
    return path


def read_iv(path) -> dict:
    """The file's tensors and metadata, checked for completeness only (no model needed)."""
    path = Path(path)
    if not path.is_file():
        raise ExtractError(f"{path}: no such IV file (run extract_iv.py to create it)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("iv_meta", "null"))
            out = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own (unexported) error type on a damaged file
        raise ExtractError(f"{path}: not a readable IV file ({e})") from None
    if not isinstance(meta, dict) or "iv" not in out or "aie" not in out or "layer" not in meta:
        raise ExtractError(f"{path}: not an IV file (needs tensors iv, aie and iv_meta metadata)")
    check_iv_content(out, meta, path)
    out["meta"] = meta
    out["layer"] = meta["layer"]
    out["heads"] = [tuple(h) for h in meta.get("heads", [])]
    return out


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_iv_content(tensors: dict, meta: dict, path) -> None:
    """What read_iv can check without a model: finite tensors of the right rank, and metadata of the
    types this code writes. A NaN IV would otherwise surface as "loss is nan ... try a lower --lr", a
    negative stored state norm would flip the IV's sign (scale_to_state), a zero one erase it."""
    def bad(what):
        raise ExtractError(f"{path}: {what}")
    if tensors["iv"].dim() != 1 or tensors["aie"].dim() != 2:
        bad(f"tensor iv must be 1-D and aie 2-D, got shapes {tuple(tensors['iv'].shape)} and {tuple(tensors['aie'].shape)}")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad(f"tensor {name} holds NaN or Inf values")
    if not _whole(meta["layer"]) or meta["layer"] < 0:
        bad(f"metadata 'layer' is {meta['layer']!r}; expected a block index (a whole number >= 0)")
    heads = meta.get("heads", [])
    if not isinstance(heads, list) or not all(isinstance(h, list) and len(h) == 2 and all(_whole(x) and x >= 0 for x in h)
                                              for h in heads):
        bad("metadata 'heads' must be a list of [layer, head] pairs of whole numbers >= 0")
    for key in ("task", "task_hash", "config_hash", "model", "kind"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            bad(f"metadata {key!r} is {meta[key]!r}; expected a string")
    for key in ("top_k", "n_layers", "n_heads", "d_model", "format"):
        if meta.get(key) is not None and (not _whole(meta[key]) or meta[key] < 0):
            bad(f"metadata {key!r} is {meta[key]!r}; expected a whole number >= 0")
    norms = meta.get("state_norms")
    if norms is not None and not (isinstance(norms, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in norms)):
        bad("metadata 'state_norms' must be a list of hidden-state norms, each finite and > 0")


def cached_iv(path: Path, task, key: dict, model) -> dict | None:
    """read_iv(path), marked r["reused"], when the file was made from these very weights, the same
    task data and the same settings (cache_matches); else None: no file, another IV, or a damaged
    file, which is then extracted again, and said so."""
    if not path.is_file():
        return None
    try:
        r = read_iv(path)
    except ExtractError as e:
        print(f"note: {e}; extracting it again", file=sys.stderr)
        return None
    return {**r, "reused": True} if cache_matches(r["meta"], task, key, model) else None


def load_iv(path, model) -> tuple[torch.Tensor, int, dict]:
    """-> (iv [C], layer, meta), checked against `model`'s architecture. The weights may differ (a
    fine-tuned copy of the model the IV came from is the normal case in training)."""
    r = read_iv(path)
    meta, mc = r["meta"], model.config
    if r["iv"].shape != (mc.hidden_size,) or tuple(r["aie"].shape) != (mc.num_hidden_layers, mc.num_attention_heads):
        raise ExtractError(f"{path}: IV of shape {tuple(r['iv'].shape)} / AIE {tuple(r['aie'].shape)} "
                           f"does not fit this model (d_model {mc.hidden_size}, "
                           f"{mc.num_hidden_layers} layers x {mc.num_attention_heads} heads)")
    if meta.get("config_hash") != config_hash(model):
        raise ExtractError(f"{path}: extracted from model {meta.get('model')!r} with config hash "
                           f"{meta.get('config_hash')}, this model's is {config_hash(model)}")
    check_layer(r["layer"], mc.num_hidden_layers, f"{path}: layer")
    outside = [h for h in r["heads"] if h[0] >= mc.num_hidden_layers or h[1] >= mc.num_attention_heads]
    if outside:
        raise ExtractError(f"{path}: metadata 'heads' names head {list(outside[0])} (layer, head), outside this "
                           f"model's {mc.num_hidden_layers} layers x {mc.num_attention_heads} heads")
    return r["iv"], r["layer"], meta


def check_iv_task(meta: dict, task, path) -> None:
    """An IV file given for `task` (--iv_file TASK=PATH) must be that task's: its metadata names the
    task it was extracted for. The same name with other data is allowed, with a warning."""
    if meta.get("task") != task.name:
        raise ExtractError(f"{path}: this IV was extracted for task {meta.get('task')!r} (its metadata), "
                           f"not {task.name!r}; give {task.name}'s IV file")
    if meta.get("task_hash") not in (None, task_fingerprint(task)):
        print(f"warning: {path}: IV of task {task.name!r} extracted from other data (hash "
              f"{meta.get('task_hash')}, this task's {task_fingerprint(task)})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# extract_iv.py's outputs: checked before the work, every write error one line naming the file

def iv_out_path(out, tag: str, task=None) -> Path:
    """The IV file of `task` or, task None, the folder of --universal: `out` (--out) when given,
    else under ivs/<tag>/."""
    if task is None:
        return Path(out or Path("ivs") / tag / "universal")
    return Path(out or Path("ivs") / tag / iv_filename(task))


def check_outputs(out: Path, is_folder: bool, out_flag: str, report=None) -> None:
    """Every place an extraction writes (the IV file or folder `out`, with the heatmap and sweep plot
    beside it, and the --report file) must be writable before the model is loaded. Nothing is
    created. out_flag: how the error names `out` ("--out", or "IV file" for the default path)."""
    targets = [(out_flag, out, is_folder)] + ([("--report", Path(report), False)] if report else [])
    for flag, path, folder in targets:
        if path.exists() and path.is_dir() != folder:
            raise ExtractError(f"{flag} {path}: is a {'file' if folder else 'folder'}, this needs a "
                               f"{'folder' if folder else 'file path'}")
        try:
            check_writable(path if folder else path.parent)
        except OSError as e:
            raise ExtractError(f"{flag} {path}: {e}") from None


def written(path, write, *args, **kwargs):
    """write(*args, **kwargs), with a write error as one line naming `path`: a full disk raises an
    OSError without a file name, and safetensors its own SafetensorError, not an OSError."""
    try:
        return write(*args, **kwargs)
    except (OSError, SafetensorError) as e:
        detail = (e.strerror if isinstance(e, OSError) else None) or str(e)
        where = getattr(e, "filename", None) or path       # the heatmap beside the IV file, say
        raise ExtractError(detail if str(where) in detail else f"{where}: cannot write ({detail})") from None


# ---------------------------------------------------------------------------------------------
# The head sets of a run's IVs (--head_mse_weight); the IVs themselves: extract_iv.training_ivs

def scale_to_state(iv: torch.Tensor, meta: dict, layer: int, ratio: float, where: str) -> torch.Tensor:
    """The IV rescaled to `ratio` x the mean hidden-state norm at `layer` on the task's training prompts
    (meta["state_norms"], stored at extraction): an IV larger than the state it is added to overwrites
    it rather than steering it. ratio 0 = the IV as extracted."""
    if ratio <= 0:
        return iv
    norms = meta.get("state_norms")
    if not norms or len(norms) <= layer:
        raise ExtractError(f"{where}: no hidden-state norm at layer {layer} stored (meta['state_norms']); "
                           "extract it again with this version of extract_iv.py")
    return iv * (ratio * norms[layer] / iv.norm().clamp_min(1e-12))


def union_of_top_heads(ivs: dict) -> dict:
    """{layer: LongTensor heads}: every head that is among some task's top heads (--head_mse_weight)."""
    by_layer = {}
    for _, _, meta in ivs.values():
        for layer, head in (meta.get("heads") or []):
            by_layer.setdefault(int(layer), set()).add(int(head))
    if not by_layer:
        raise ExtractError("--head_mse_weight needs IVs whose metadata names their top heads (--kind heads)")
    return {l: torch.tensor(sorted(h)) for l, h in sorted(by_layer.items())}
