"""Drift: how far a tuned model's next-token distributions have moved from the original model's, on
the original's own replies to everyday prompts (data/everyday.jsonl, written by data/make_ifeval.py).

    KL(original || tuned) per token = sum over reply tokens t of
        sum_v p_orig(v | prompt, reply[:t]) * (log p_orig(v | ...) - log p_tuned(v | ...))
    divided by the number of reply tokens (pooled over prompts).

The replies are the original model's greedy replies (chat format, default system prompt, at most 64
tokens, its end-of-turn token included when it stops), generated once and cached in a file named by
what they depend on (the weights, the config, the prompts, the budget). Both models are then run
teacher-forced on the same sequences. It is continuous and has no floor, unlike a task score, and it is
the quantity forgetting follows in Shenfeld et al. 2025 ("RL's Razor"): the forward KL to the original,
measured on the original's own distribution of text.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ivft.engine import eval_mode, greedy_generate, lm_head_fp32, model_device
from ivft.files import write_json_atomic
from ivft.ivfile import config_hash, weight_fingerprint

EVERYDAY_FILE = Path(__file__).resolve().parent.parent / "data" / "everyday.jsonl"
REPLY_TOKENS = 64        # the original's reply budget
KL_CHUNK = 256           # scored positions per output-layer call: (256, 49152) fp32 is 50 MB


class DriftError(ValueError):
    """A prompt file or reply cache that cannot be used: one line naming the file."""


def load_everyday(path=EVERYDAY_FILE, n: int | None = None) -> list[str]:
    """The prompts of an everyday JSONL file ({"prompt": ...} per line), the first n when given."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DriftError(f"{path}: cannot read ({e.strerror or e}); run `python data/make_ifeval.py`") from None
    prompts = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DriftError(f"{path}:{i}: expected a JSON object with a 'prompt' string") from None
    return prompts[:n] if n else prompts


def chat_replies(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 32,
                 progress: bool = False) -> tuple[list, list]:
    """The model's greedy replies to user messages in its chat format (default system prompt):
    (prompt ids per prompt, reply ids per prompt, up to and including the first stop token)."""
    ids = [tok.render_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    replies = greedy_generate(model, ids, max_new_tokens, stop_ids=tok.stop_ids(), batch_size=batch_size,
                              progress=progress)
    return ids, replies


def reply_key(model, prompts: list[str], max_new_tokens: int) -> dict:
    """What the original's replies depend on, by content."""
    data = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"weights": weight_fingerprint(model), "config": config_hash(model), "prompts": data,
            "n": len(prompts), "max_new_tokens": max_new_tokens}


def reply_cache_path(folder, key: dict) -> Path:
    return Path(folder) / f"replies-{key['weights']}-{key['config']}-{key['prompts']}-{key['max_new_tokens']}.json"


def original_replies(model, tok, prompts: list[str], cache_dir, max_new_tokens: int = REPLY_TOKENS,
                     batch_size: int = 32, progress: bool = False) -> dict:
    """The original model's replies, from cache_dir when they were generated before (same key), else
    generated and written there. -> {"key", "prompt_ids", "reply_ids", "text"}."""
    key = reply_key(model, prompts, max_new_tokens)
    path = reply_cache_path(cache_dir, key)
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DriftError(f"{path}: unreadable reply cache ({e}); delete it to regenerate") from None
        if saved.get("key") == key:
            return saved
    with eval_mode(model):
        prompt_ids, reply_ids = chat_replies(model, tok, prompts, max_new_tokens, batch_size, progress)
    stop = tok.stop_ids()
    text = [tok.decode([t for t in r if t not in stop]) for r in reply_ids]
    out = {"key": key, "prompt_ids": prompt_ids, "reply_ids": reply_ids, "text": text}
    try:
        write_json_atomic(path, out, indent=None)
    except OSError as e:           # its message names the file
        raise DriftError(f"reply cache: {e}") from None
    return out


def _batch(seqs, device):
    """Right-padded inputs prompt + reply[:-1] (B, T), their pad mask, and the scored positions
    (B, T) bool: those whose next token is a reply token."""
    T = max(len(p) + len(r) - 1 for p, r in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    scored = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (p, r) in enumerate(seqs):
        x = list(p) + list(r[:-1])
        idx[b, :len(x)] = torch.tensor(x)
        mask[b, :len(x)] = True
        scored[b, len(p) - 1:len(x)] = True          # position len(p)-1 predicts reply[0]
    return idx.to(device), mask.to(device), scored.to(device)


@torch.no_grad()
def _kl_rows(original, tuned, h_o, h_t):
    """KL(original || tuned) at each of M positions from their final hidden states (M, C) -> (M,)."""
    out = []
    for s in range(0, len(h_o), KL_CHUNK):
        lp_o = lm_head_fp32(original, h_o[s:s + KL_CHUNK]).log_softmax(-1)     # (m, V)
        lp_t = lm_head_fp32(tuned, h_t[s:s + KL_CHUNK]).log_softmax(-1)        # (m, V)
        out.append((lp_o.exp() * (lp_o - lp_t)).sum(-1))
    return torch.cat(out) if out else h_o.new_zeros(0)


@torch.no_grad()
def drift_kl(original, tuned, prompt_ids: list, reply_ids: list, batch_size: int = 16) -> dict:
    """KL(original || tuned) on the given sequences, teacher-forced (autocast is the caller's; the
    output layer is fp32). -> {"kl_per_token": pooled mean, "kl_sum": [per sequence], "tokens":
    [per sequence]}: the per-sequence sums are what a bootstrap over prompts resamples."""
    if len(prompt_ids) != len(reply_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(reply_ids)} replies")
    if any(not p for p in prompt_ids) or any(not r for r in reply_ids):
        raise ValueError("drift_kl: every prompt and reply needs at least one token")
    seqs = list(zip(prompt_ids, reply_ids))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))   # less padding
    sums = [0.0] * len(seqs)
    dev = model_device(tuned)
    with eval_mode(original), eval_mode(tuned):
        for b0 in range(0, len(order), batch_size):
            rows = order[b0:b0 + batch_size]
            idx, mask, scored = _batch([seqs[i] for i in rows], dev)
            h_o = original(idx, pad_mask=mask, return_hidden=True)[scored]       # (M, C), row-major
            h_t = tuned(idx, pad_mask=mask, return_hidden=True)[scored]          # (M, C)
            kl = _kl_rows(original, tuned, h_o, h_t)                             # (M,)
            which = torch.arange(len(rows), device=dev)[:, None].expand_as(scored)[scored]
            per_row = torch.zeros(len(rows), dtype=torch.float64, device=dev).index_add_(0, which, kl.double())
            for r, v in zip(rows, per_row.tolist()):
                sums[r] = v
    tokens = [len(r) for r in reply_ids]
    return {"kl_per_token": sum(sums) / sum(tokens), "kl_sum": sums, "tokens": tokens}
