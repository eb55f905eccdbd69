"""The memory plan of a training run, from config.json alone (no weights are read): what train.py
will hold on the device for the chosen flags, and whether it fits (train.py --dry_run prints it).

What is counted (bytes):
  weights        every parameter once (a tied embedding once), in --model_dtype
  adapters       LoRA A, B in fp32, plus the finished tasks' frozen ones (lora.finish_task)
  gradients      one per trained parameter, in its dtype
  optimizer      AdamW's two moments, fp32 (ivft/optim.py keeps them fp32 for bf16 weights too)
  master         fp32 copies of bf16 trained weights (ivft/optim.py MasterAdamW)
  reference      a frozen copy of the model for the KL: full fine-tuning only (LoRA's reference is
                 the same weights with adapters off: 0)
  autocast copy  bf16 copies of fp32 weights that autocast makes and the backward keeps
  activations    what the backward needs, per token (activation_bytes_per_token says what), times
                 micro_batch x max_len tokens, plus the fp32 LM-head logits of the scored positions
Peak = everything above held at once. That is what gradient accumulation gives (a micro-batch's
forward runs while the previous one's gradients are held); with one micro-batch per step it is an
upper bound by up to the smaller of gradients and activations. Not counted: the CUDA context and
allocator fragmentation (a few hundred MB to a few GB: keep `headroom` free), evaluation (no
gradients, smaller), the IV extraction before training (forward passes only), and the extra forward
of --free_kl_weight (prompts without the instruction: shorter than the batch).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ivft import lora
from ivft.errors import LoadError, TrainError
from ivft.load import config_from_hf, default_gguf_path, gguf_cache_path
from model import Transformer

GiB = 1024 ** 3


@dataclass(frozen=True)
class RunShape:
    """The flags the memory depends on (train.py's names)."""
    lora_r: int = 0                           # 0 = full fine-tuning (--regime full)
    lora_targets: tuple = ("q_proj", "v_proj")
    lora_dropout: float = 0.1
    n_tasks: int = 1                          # finished adapters stack up (merge policy): all counted
    model_dtype: str = "fp32"                 # "fp32" | "bf16" storage of the weights
    amp: str | None = "bf16"                  # autocast dtype: "bf16" or None (plain fp32)
    micro_batch: int = 8                      # rows per forward pass
    max_len: int = 256                        # tokens per row (the longest; counted for every row)
    reference: bool = False                   # a KL / head-MSE reference (--guided, lwf, fvg)
    grad_checkpointing: bool = False
    attention: str = "flash"                  # "flash": SDPA keeps no scores; "math": it keeps (H, T, T)
    fsdp_ranks: int = 1                       # weights, gradients, optimizer, masters sharded over ranks
    ddp: bool = False                         # DDP (torchrun without --fsdp): gradient buckets


@dataclass
class Plan:
    rows: dict = field(default_factory=dict)   # {what: bytes}, in print order
    per_token: int = 0                          # activation bytes of one token (all layers)
    tokens: int = 0
    params: int = 0
    trained: int = 0
    device_bytes: int | None = None
    headroom: int = 0

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def fits(self) -> bool:
        return self.device_bytes is None or self.total + self.headroom <= self.device_bytes


def read_config(model_path) -> dict:
    """config.json of an HF directory (or the file itself); a GGUF's converted cache directory."""
    path = default_gguf_path() if model_path is None else Path(model_path)
    if path.suffix == ".gguf":
        path = gguf_cache_path(path)
    cfg_file = path / "config.json" if path.is_dir() or path.suffix == ".gguf" else path
    try:
        return json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise TrainError(f"{cfg_file}: no config.json (a .gguf is converted on its first load; load "
                         f"it once, or pass an HF model directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{cfg_file}: unreadable ({type(e).__name__})") from None


def count_params(config: dict, run: RunShape) -> dict:
    """Parameter counts of the model of `config`, built on the meta device (exact for every family
    model.py knows, and no memory is used): {"all": base parameters (a tied weight once), "trained",
    "block_linear": weights of the blocks' linear layers (what autocast copies), "adapted": {LoRA
    layer: (in, out)}}."""
    try:
        mc = config_from_hf(config, "config.json")
    except LoadError as e:
        raise TrainError(str(e)) from None
    with torch.device("meta"):
        model = Transformer(mc)
        blocks = sum(p.numel() for p in model.model.layers.parameters())
        out = {"all": sum(p.numel() for p in model.parameters()), "adapted": {},
               "block_linear": sum(m.weight.numel() for m in model.model.layers.modules()
                                   if isinstance(m, torch.nn.Linear)),
               "one_block": blocks // mc.num_hidden_layers}
        out["outside_blocks"] = out["all"] - blocks            # embeddings, final norm, LM head
        if run.lora_r > 0:
            lora.add_lora(model, run.lora_r, 2.0 * run.lora_r, 0.0, run.lora_targets)
            out["adapted"] = {k: (m.in_features, m.out_features) for k, m in lora.lora_layers(model).items()}
    out["trained"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def activation_bytes_per_token(config: dict, run: RunShape, adapted: dict) -> int:
    """Bytes one token keeps for the backward pass, all layers (the LM head's logits are apart).
    a = bytes of matmul outputs (2 under bf16, else 4); norms compute in fp32. Per block:
      RMSNorm x2      its fp32 input (4C), and its normalised x (4C) when its weight trains
      linear inputs   the norms' outputs as the projections see them (aC each; q/k/v share one)
      attention       SDPA's q, k, v and output (a(2HD + 2GD)), its logsumexp (4H); "math" SDPA also
                      the (H, T) softmax of every query; o_proj's input, z reshaped (aHD)
      MLP             SwiGLU: gate, silu(gate), up and their product (4aF); GELU: up and gelu (2aF)
      LoRA per target dropout's output (4 in) and mask (1 in), A x (4r); in fp32 whatever a is
    With gradient checkpointing a block keeps only its input, and one block is recomputed at a
    time: L x (its input) + one block's full set."""
    C, F_, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    H = config["num_attention_heads"]
    G = config.get("num_key_value_heads") or H
    D = config.get("head_dim") or C // H
    a = 2 if run.amp == "bf16" or run.model_dtype == "bf16" else 4
    res = 2 if run.model_dtype == "bf16" else 4                   # the residual stream's dtype
    norms_train = run.lora_r == 0
    norm = 4 * C + (4 * C if norms_train else 0)
    block = 2 * norm + 2 * a * C                                  # two norms and their outputs
    block += a * (2 * H * D + 2 * G * D) + 4 * H + a * H * D      # SDPA in/out, lse, o_proj input
    if run.attention == "math":
        block += a * H * run.max_len
    swiglu = config.get("model_type") != "gpt2"
    block += (4 if swiglu else 2) * a * F_
    if adapted:
        per_layer = [io for name, io in adapted.items() if ".layers.0." in f".{name}."]
        drop = 5 if run.lora_dropout > 0 else 4
        block += sum(drop * i + 4 * run.lora_r for i, _ in per_layer)
    final = norm + a * C                                          # the final norm and the head's input
    if run.grad_checkpointing:
        return L * res * C + block + final
    return L * block + final


def logits_bytes(config: dict, run: RunShape) -> int:
    """The fp32 LM head at every position of the micro-batch (an upper bound: only answer tokens, and
    the last prompt token for the KL, are scored): logits or their gradient, log-softmax, and its
    gradient, 4 bytes each; the KL adds its two distributions and their product on one row each."""
    V = config["vocab_size"]
    rows = run.micro_batch * run.max_len
    kl = 3 * run.micro_batch if run.reference else 0
    return 4 * V * (3 * rows + kl)


def plan(config: dict, run: RunShape, device_bytes: int | None = None, headroom: int = 0) -> Plan:
    counts = count_params(config, run)
    n, trained, adapted = counts["all"], counts["trained"], counts["adapted"]
    w = 2 if run.model_dtype == "bf16" else 4
    shard = run.fsdp_ranks
    p = Plan(params=n, trained=trained, device_bytes=device_bytes, headroom=headroom)
    p.rows["weights"] = n * w // shard
    if run.lora_r > 0:
        p.rows["adapters (fp32, finished ones stacked)"] = 4 * trained * run.n_tasks
    p.rows["gradients"] = trained * (4 if run.lora_r > 0 else w) // shard
    p.rows["optimizer (AdamW, 2 fp32 moments)"] = 8 * trained // shard
    p.rows["master weights (fp32)"] = 4 * trained // shard if run.lora_r == 0 and w == 2 else 0
    # train.py's frozen copy stays outside the FSDP-wrapped module: whole on every rank
    p.rows["reference copy"] = n * w if run.reference and run.lora_r == 0 else 0
    # autocast casts fp32 weights to bf16 for each matmul; the backward keeps the copies (for the
    # input's gradient) unless the block is recomputed; trained leaves are cached by autocast anyway.
    # Under FSDP they are copies of the gathered (whole) weights
    keeps = run.amp == "bf16" and w == 4 and (run.lora_r == 0 or not run.grad_checkpointing)
    p.rows["autocast bf16 weight copies"] = 2 * counts["block_linear"] if keeps else 0
    if shard > 1:   # ivft/dist.py keeps the root unit (embeddings, LM head) gathered, and one block at a time
        p.rows["FSDP gathered weights"] = (counts["outside_blocks"] + counts["one_block"]) * w
    if run.ddp:     # DDP reduces gradients through buckets of its own: one more copy of them
        p.rows["DDP gradient buckets"] = p.rows["gradients"]
    p.per_token = activation_bytes_per_token(config, run, adapted)
    p.tokens = run.micro_batch * run.max_len
    p.rows["activations"] = p.per_token * p.tokens
    p.rows["LM-head logits (fp32)"] = logits_bytes(config, run)
    return p


def format_plan(p: Plan) -> str:
    """The plan as a small table, GiB."""
    lines = [f"memory plan: {p.params / 1e9:.2f} B parameters, {p.trained / 1e6:.1f} M trained, "
             f"{p.tokens} tokens per micro-batch"]
    for k, v in p.rows.items():
        lines.append(f"  {k:<40} {v / GiB:9.2f} GiB")
    lines.append(f"  (activations per token: {p.per_token / 2 ** 20:.2f} MiB)")
    lines.append(f"  {'total':<40} {p.total / GiB:9.2f} GiB")
    if p.device_bytes is not None:
        verdict = "fits" if p.fits() else "does NOT fit"
        lines.append(f"  {'device':<40} {p.device_bytes / GiB:9.2f} GiB: {verdict}"
                     + (f" (keeping {p.headroom / GiB:.1f} GiB free)" if p.headroom else ""))
    return "\n".join(lines)


# What to change when a plan does not fit, in the order it is suggested: the cheapest change first.
def _remedies(run: RunShape):
    if not run.grad_checkpointing:
        yield "--grad_checkpointing", replace(run, grad_checkpointing=True)
    mb = run.micro_batch
    while mb > 1:
        mb //= 2
        yield f"--micro_batch {mb}", replace(run, micro_batch=mb)
    if run.lora_r > 0 and run.model_dtype == "fp32":
        yield "--model_dtype bf16 (the frozen LoRA base in bf16)", replace(run, model_dtype="bf16")
    if run.lora_r == 0 and run.model_dtype == "fp32":
        yield "--model_dtype bf16", replace(run, model_dtype="bf16")
    if run.lora_r == 0:     # full fine-tuning stays full fine-tuning: sharded over several GPUs
        for n in (2, 4, 8):
            yield (f"FSDP over {n} GPUs (torchrun --nproc_per_node {n} train.py --fsdp)",
                   replace(run, fsdp_ranks=n))


def check_fits(config: dict, run: RunShape, device_bytes: int, headroom: int = 0):
    """Raise TrainError (one line) when the run does not fit, naming the first change that makes it fit."""
    p = plan(config, run, device_bytes, headroom)
    if p.fits():
        return p
    fix = next((flag for flag, r in _remedies(run) if plan(config, r, device_bytes, headroom).fits()), None)
    lora_run = replace(run, lora_r=8, model_dtype="bf16")
    if run.lora_r == 0 and plan(config, lora_run, device_bytes, headroom).fits():
        fix = f"{fix}, or --regime lora on this one" if fix else "--regime lora"
    biggest = max(p.rows, key=p.rows.get)
    raise TrainError(f"the run needs {p.total / GiB:.1f} GiB (largest: {biggest}, {p.rows[biggest] / GiB:.1f} "
                     f"GiB) but the device has {device_bytes / GiB:.1f} GiB: "
                     + (f"use {fix}" if fix else "no single flag makes it fit; use a smaller model"))


def device_memory(device) -> int:
    """Bytes of memory of `device`: the GPU's total, or the machine's RAM (MemTotal of /proc/meminfo)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise TrainError("cannot read the machine's memory (/proc/meminfo); pass the device's size")


def dry_run(model_path, run: RunShape, device_bytes: int | None = None, headroom: int = 0) -> str:
    """train.py --dry_run: read config.json only, and return the plan as a table; raises TrainError
    (one line, with the flag to change) when it does not fit in device_bytes."""
    config = read_config(model_path)
    p = plan(config, run, device_bytes, headroom)
    text = format_plan(p)
    if device_bytes is not None and not p.fits():
        print(text)
        check_fits(config, run, device_bytes, headroom)
    return text
