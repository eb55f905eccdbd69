"""The training data: task lists from flags, examples encoded exactly as evaluation renders them,
the per-stage pool (with replay), a deterministic batch order, padded micro-batches, and the
learning-rate schedule.

A training example is one token list: chat prompt + answer + end-of-turn token; only the answer
part (incl. the end-of-turn token, so the model learns to stop) is trained on.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ivft.prompts import answer_ids, end_of_turn_id, render_prompt
from ivft.runtime import TrainError


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
    """-> (token ids, prompt length). Prompt and answer are evaluation's (render_prompt zero-shot
    with the instruction; answer_ids = the answer + the end-of-turn token, which generation stops
    on, so it is trained on too): training and evaluation see the same tokens. A too-long prompt
    loses its start."""
    prompt = list(render_prompt(tok, ex, with_instruction=True))
    answer = list(answer_ids(tok, ex.output))
    eot = end_of_turn_id(tok)
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


def step_micro_batches(pool: list[Item], step: int, cfg, stage: int, rank: int = 0, world: int = 1) -> list[list[Item]]:
    """This rank's micro-batches of one optimizer step. The global batch is sorted by length first
    so that rows of similar length share a micro-batch (less padding), then dealt out in slices."""
    items = sorted((pool[i] for i in batch_indices(len(pool), step, cfg, stage)), key=lambda it: len(it.ids))
    mb = cfg["micro_batch"]
    chunks = [items[i:i + mb] for i in range(0, len(items), mb)]
    return chunks[rank::world]


def step_counts(micro: list[dict], device) -> torch.Tensor:
    """(answer tokens, rows, real tokens) of one rank's micro-batches, float64 for the all-reduce."""
    return torch.tensor([sum(int((m["targets"] != -100).sum()) for m in micro), sum(len(m["idx"]) for m in micro),
                         sum(m["n_tokens"] for m in micro)], dtype=torch.float64, device=device)


# ---------------------------------------------------------------------------------------------

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

