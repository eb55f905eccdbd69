"""The training data: task lists from flags, examples encoded exactly as evaluation renders them,
the per-stage pool (with replay), a deterministic batch order and padded micro-batches. (The
learning-rate schedule is method: it is in train.py.)

A training example is one token list: chat prompt + answer + end-of-turn token; only the answer
part (incl. the end-of-turn token, so the model learns to stop) is trained on.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch

from ivft import tasks as task_lib
from ivft.errors import TrainError
from ivft.prompts import answer_ids, end_of_turn_id, render_prompt


def load_task_list(spec: str | None, default_fn: str, what: str) -> list:
    """Tasks from a flag: a comma-separated list of registry names or files (any format
    tasks.load_task reads: the suite's x.train.jsonl + x.test.jsonl, Alpaca, TRACE, SuperNI);
    None = the registry's list `default_fn`; "none" = no general tasks."""
    if spec is not None and spec.strip().lower() == "none" and what == "general":
        return []
    names = None if spec is None else [s.strip() for s in spec.split(",") if s.strip()]
    out = task_lib.load_tasks(names, getattr(task_lib, default_fn), TrainError, f"{what} tasks: ")
    if not out and what == "training":
        raise TrainError("the training sequence is empty (--tasks)")
    seen = [t.name for t in out]
    if len(set(seen)) != len(seen):
        raise TrainError(f"{what} tasks repeat a name: {seen}")
    return out


def encode_example(tok, ex, max_len: int) -> tuple[list[int], int]:
    """-> (token ids, prompt length). Prompt and answer are evaluation's (render_prompt zero-shot
    with the instruction; answer_ids = the answer + the end-of-turn token, which generation stops
    on, so it is trained on too): training and evaluation see the same tokens. A too-long prompt
    loses its start."""
    prompt = list(render_prompt(tok, ex, with_instruction=True))
    answer = list(answer_ids(tok, ex.output))
    eot = end_of_turn_id(tok)
    if eot is not None and answer[-1] != eot:
        answer.append(eot)
    answer = answer[:max_len - 1]
    keep = max_len - len(answer)
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep:]
    return prompt + answer, len(prompt)


@dataclass
class Item:
    ids: list       # prompt + answer token ids
    prompt_len: int
    task: int       # index into the training sequence (for replay rows and their IV)
    free: list | None = None   # the prompt without the task's instruction (the input alone), if asked for
    other: list | None = None  # a prompt carrying another task's instruction, if asked for


def other_tasks(spec: str, taken: list) -> list:
    """The tasks of --other_kl_tasks; one that is also trained or evaluated (by name) is refused: the KL
    would hold the model to the very prompts it is trained or scored on."""
    out = load_task_list(spec, "default_sequence", "--other_kl_tasks")
    if clash := sorted({t.name for t in out} & {t.name for t in taken}):
        raise TrainError(f"--other_kl_tasks: {', '.join(clash)} also trained or evaluated in this run; name "
                         "tasks that are neither (default: category, sentiment, spell, name_swap, time_12h)")
    return out


def other_prompts(tok, tasks: list, max_len: int) -> list[list]:
    """Every training example's prompt of the tasks, with its instruction, as token ids (cut to max_len
    from the start): the pool the rows' other-instruction prompts are drawn from."""
    return [list(render_prompt(tok, ex, with_instruction=True))[-max_len:] for t in tasks for ex in t.train]


def encode_task(tok, task, index: int, max_len: int, max_train: int | None = None,
                free: bool = False, other: list | None = None, seed: int = 0) -> list[Item]:
    """The task's training examples as Items; free: also each prompt without the instruction (the
    query alone, cut to max_len from its start), for a KL on prompts the new instruction is absent from;
    other: a pool of prompts with other instructions (other_prompts), one drawn for each row by a
    generator seeded by (seed, index), for a KL on prompts where another instruction is given."""
    examples = list(task.train)[:max_train] if max_train else list(task.train)
    if not examples:
        raise TrainError(f"training task {task.name!r} has no training examples")
    items = [Item(*encode_example(tok, ex, max_len), index) for ex in examples]
    if free:
        for ex, it in zip(examples, items):
            it.free = list(render_prompt(tok, ex, with_instruction=False))[-max_len:]
    if other:
        draw = torch.Generator().manual_seed(seed * 1000 + index)
        for it, j in zip(items, torch.randint(len(other), (len(items),), generator=draw).tolist()):
            it.other = other[j]
    # encode_example keeps a too-long prompt's end; say how many lost their start, once per task. Only
    # a row that fills max_len can have been cut, so only those are rendered again to tell.
    n_cut = sum(len(render_prompt(tok, ex, with_instruction=True)) > it.prompt_len
                for ex, it in zip(examples, items) if len(it.ids) == max_len)
    if n_cut:
        print(f"warning: training task {task.name!r}: {n_cut} of {len(items)} examples are longer than "
              f"--max_len {max_len} tokens: their prompts are cut from the start (an answer that is "
              f"longer on its own is cut at its end)", file=sys.stderr)
    return items


def stage_pool(encoded: list[list[Item]], j: int, replay: float, seed: int) -> list[Item]:
    """Training examples of stage j: task j's, plus (--replay) a fixed random sample of earlier ones."""
    pool = list(encoded[j])
    n_replay = int(round(replay * len(pool)))
    earlier = [it for i in range(j) for it in encoded[i]]
    if n_replay and earlier:
        g = torch.Generator().manual_seed(seed * 1000 + j)
        pick = torch.randint(len(earlier), (n_replay,), generator=g) if n_replay > len(earlier) \
            else torch.randperm(len(earlier), generator=g)[:n_replay]
        pool += [earlier[i] for i in pick.tolist()]
    return pool


def steps_for(n_items: int, batch_size: int, epochs: float, max_steps: int = 0) -> int:
    """Optimizer steps of a stage: max_steps if set, else enough for `epochs` passes over the pool."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * n_items / batch_size))


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, stage: int, epoch: int, n: int) -> tuple:
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 1009 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, step: int, batch_size: int, seed: int, stage: int) -> list[int]:
    """Example indices of optimizer step `step`: consecutive slices of a stream of per-epoch
    permutations. A pure function of (seed, stage, step), which is what makes resuming exact."""
    B = batch_size
    return [epoch_order(seed, stage, pos // n, n)[pos % n] for pos in range(step * B, (step + 1) * B)]


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
    out = {"idx": idx.to(device), "targets": targets.to(device),
           "pad_mask": None if pad_mask.all() else pad_mask.to(device),
           "last": last.to(device), "task": task.to(device), "n_tokens": int(pad_mask.sum())}
    for key in ("free", "other"):     # the rows' extra prompts, if any: free (B, T'), free_mask, free_last
        if getattr(items[0], key) is None:
            continue
        rows = [getattr(it, key) for it in items]
        Tf = max(len(r) for r in rows)
        ids = torch.full((B, Tf), pad_id, dtype=torch.long)
        mask = torch.zeros(B, Tf, dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, :len(r)] = True
        out.update({key: ids.to(device), f"{key}_mask": None if mask.all() else mask.to(device),
                    f"{key}_last": torch.tensor([len(r) - 1 for r in rows], dtype=torch.long).to(device)})
    return out


def step_micro_batches(pool: list[Item], step: int, stage: int, *, batch_size: int, micro_batch: int, seed: int,
                       rank: int = 0, world: int = 1) -> list[list[Item]]:
    """This rank's micro-batches of one optimizer step. The global batch is sorted by length first
    so that rows of similar length share a micro-batch (less padding), then dealt out in slices."""
    order = batch_indices(len(pool), step, batch_size, seed, stage)
    items = sorted((pool[i] for i in order), key=lambda it: len(it.ids))
    mb = micro_batch
    chunks = [items[i:i + mb] for i in range(0, len(items), mb)]
    return chunks[rank::world]


def step_counts(micro: list[dict], device) -> torch.Tensor:
    """(answer tokens, rows, real tokens) of one rank's micro-batches, float64 for the all-reduce."""
    return torch.tensor([sum(int((m["targets"] != -100).sum()) for m in micro), sum(len(m["idx"]) for m in micro),
                         sum(m["n_tokens"] for m in micro)], dtype=torch.float64, device=device)
