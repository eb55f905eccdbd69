"""Method, not plumbing: the prompts of an IV extraction (extract_iv.py) — the dev split, the clean
prompts (k demonstrations, each with the instruction, then the query) and the corrupted ones (the
instruction's signal removed), which decide what the IV is. Also the plain batched run over them,
score_prompts: the teacher-forced forward that the extraction reads z and the residual stream from
and the check (ivft.ivcheck) reads its scores from."""
from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ivft.engine import lm_head_fp32, model_device
from ivft.errors import ExtractError
from ivft.ivsettings import Settings
from ivft.prompts import answer_ids, bos_ids, continuation_ids, render_prompt
from ivft.tasks import list_tasks, load_tasks, user_prompt
from model import Intervention


# ---------------------------------------------------------------------------------------------
# Tasks and prompts

def load_task_by_name(name: str):
    """A registry task or a user task file (tasks.load_task); its errors become one-line ExtractErrors."""
    return load_tasks([name], error=ExtractError)[0]


@dataclasses.dataclass
class Prompt:
    ids: list[int]        # the prompt, ending right before the answer
    answer: list[int]     # the answer's token ids (answer[0] = the "first answer token"), then an end token
    text: str             # the answer as text, for exact match


def chat_prompt(tok, ex, shots=(), with_instruction=True) -> Prompt:
    """The chat form (ivft.prompts' rendering, so a prompt is the same ids whether it is patched,
    trained on or scored): earlier turns as demonstrations, the answer then end-of-turn."""
    try:
        ans = answer_ids(tok, ex.output)
    except ValueError as e:
        raise ExtractError(f"example {ex.input!r}: {e}") from None
    return Prompt(render_prompt(tok, ex, shots, with_instruction), ans, ex.output)


def newline_id(tok) -> int:
    ids = continuation_ids(tok, "\n")  # the newline after an answer, not one starting a text
    if len(ids) != 1:
        raise ExtractError("format=plain needs a tokenizer with a single-token newline; use --format chat")
    return ids[0]


def plain_prompt(tok, ex, shots=(), with_instruction=True) -> Prompt:
    """"Q: <instruction>\\n<input>\\nA: <answer>" blocks separated by a blank line. A chat model
    answers a bare chat prompt in a sentence ("The opposite of hot is cold."), so the answer's first
    token is rarely its first; after k such blocks it writes the answer itself (README: clean
    first-token accuracy). The answer keeps its leading space, as it has inside the text, and ends
    with the newline that closes every demonstration."""
    def q(e):
        return user_prompt(e) if with_instruction else e.input
    text = "".join(f"Q: {q(d)}\nA: {d.output.strip()}\n\n" for d in shots) + f"Q: {q(ex)}\nA:"
    if not ex.output.strip():
        raise ExtractError(f"example {ex.input!r}: empty answer")
    ans = continuation_ids(tok, " " + ex.output.strip())
    return Prompt(bos_ids(tok) + tok.encode(text), ans + [newline_id(tok)], ex.output)


def render(tok, ex, s: Settings, shots=(), with_instruction=True) -> Prompt:
    fn = plain_prompt if s.format == "plain" else chat_prompt
    return fn(tok, ex, shots, with_instruction)


def stop_ids(tok, s: Settings) -> set[int]:
    """Tokens that end a greedy reply: the chat template's, plus the newline in the plain form."""
    return set(tok.stop_ids()) | ({newline_id(tok)} if s.format == "plain" else set())


# ---------------------------------------------------------------------------------------------
# Which examples, and the clean and corrupted prompts built from them

def draw_demos(rng: random.Random, pool: list, ex, k: int) -> list:
    # k demonstrations for `ex`, never `ex` itself
    others = [d for d in pool if d is not ex]
    return rng.sample(others, min(k, len(others))) if k else []


def draw_examples(rng, pool, n, avoid=()):
    # n examples from pool, those whose id() is not in `avoid` first (so clean and corrupted prompts
    # are different examples when the split is large enough)
    first = [e for e in pool if id(e) not in avoid]
    rest = [e for e in pool if id(e) in avoid]
    rng.shuffle(first)
    rng.shuffle(rest)
    return (first + rest)[:n]


def split_train(task, s: Settings) -> tuple[list, list]:
    """(pool, dev): the training examples, shuffled by seed; up to n_dev (at most a quarter) are the
    dev split for choosing layer and K, the rest feed extraction and every prompt's demonstrations.
    Test examples are never used here: they are --check's."""
    ex = list(task.train)
    random.Random(f"dev-{s.seed}").shuffle(ex)
    n_dev = min(s.n_dev, len(ex) // 4)
    return ex[n_dev:], ex[:n_dev]


def clean_prompts(tok, task, examples, s: Settings, rng, pool=None) -> list[Prompt]:
    """k demonstrations from `pool` (default: the task's training examples), each with the
    instruction, then the example's instruction + input."""
    pool = task.train if pool is None else pool
    return [render(tok, ex, s, draw_demos(rng, pool, ex, s.shots)) for ex in examples]


def corrupted_prompts(tok, task, examples, s: Settings, rng, other_task=None, pool=None) -> list[Prompt]:
    """The same inputs with the instruction's signal removed (the answers stay the task's):
    - query_only (default): the input alone, zero-shot, so the IV is exactly what the instruction
      and the demonstrations add to the bare input, and the form it must repair when it is used;
    - shuffled: Todd's corruption, k demonstrations whose answers are permuted among them, without
      the instruction, so no consistent input -> output mapping is left to infer the task from;
    - mismatched: the input under another task's instruction, zero-shot."""
    pool = task.train if pool is None else pool
    out = []
    for ex in examples:
        if s.corrupt == "query_only":
            out.append(render(tok, ex, s, with_instruction=False))
        elif s.corrupt == "shuffled":
            demos = draw_demos(rng, pool, ex, s.shots)
            # a cyclic shift guarantees that no demonstration keeps its own answer
            shift = rng.randrange(1, len(demos))
            demos = [dataclasses.replace(d, output=demos[(i + shift) % len(demos)].output)
                     for i, d in enumerate(demos)]
            out.append(render(tok, ex, s, demos, with_instruction=False))
        else:
            other = rng.choice(other_task.train).instruction
            out.append(render(tok, dataclasses.replace(ex, instruction=other), s))
    return out


def mismatch_donor(task, s: Settings):
    """The task that lends its instruction to corrupt="mismatched" (None for the other corruptions)."""
    if s.corrupt != "mismatched":
        return None
    if s.mismatch_task is not None:
        return load_task_by_name(s.mismatch_task)
    names = [n for n in list_tasks() if n != task.name]
    if not names:
        raise ExtractError("corrupt=mismatched needs a second task to borrow an instruction from")
    return load_task_by_name(names[0])


def check_distinct(tok, examples, clean: list[Prompt], s: Settings, task_name: str):
    """Mediation needs the corrupted form to lack something the clean one has: with no instruction
    and no demonstrations (a function-vector file at shots=0) the two are the same prompt."""
    if s.corrupt == "query_only" and all(c.ids == render(tok, ex, s, with_instruction=False).ids
                                         for ex, c in zip(examples, clean)):
        raise ExtractError(f"task {task_name!r}: the clean and corrupted prompts are identical (no "
                           f"instruction and no demonstrations to remove); use --shots >= 1")


# ---------------------------------------------------------------------------------------------
# Plain batched scoring: answer probabilities, z and the residual stream at the last prompt token.

def pad_left(seqs: list[list[int]], device=None):
    """Left-pad to one width (pad id 0; padded keys are masked out) -> (idx, pad_mask) on `device`
    (built on the CPU, then one copy each). pad_mask None when nothing is padded, so equal-length
    batches take the model's plain causal fast path."""
    W = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), W, dtype=torch.long)
    mask = torch.zeros(len(seqs), W, dtype=torch.bool)
    for r, s in enumerate(seqs):
        idx[r, W - len(s):] = torch.tensor(s)
        mask[r, W - len(s):] = True
    return idx.to(device), (None if mask.all() else mask.to(device))


@torch.no_grad()
def score_prompts(model, prompts: list[Prompt], *, record_z=False, record_resid=False, add=None,
                  batch_size=16, desc=None) -> dict:
    """One teacher-forced forward per batch over prompt + answer. Per prompt: p_first = P(answer[0]),
    top1 = whether answer[0] is the argmax, logprob = log P(whole answer); with record_z also z
    [n, L, H, D], with record_resid the residual stream after every block [n, L, C], both at the
    last prompt token. add = (layer, vector) adds an IV there (the check). The scores, z and resid
    come back on the CPU, whatever the model's device."""
    L, dev = model.n_layers, model_device(model)
    add = (add[0], add[1].to(dev)) if add is not None else None
    p_first, top1, logprob, zs, rs = [], [], [], [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = prompts[i:i + batch_size]
        seqs = [p.ids + p.answer[:-1] for p in batch]
        idx, pad_mask = pad_left(seqs, dev)
        W = idx.shape[1]
        last = torch.tensor([W - len(s) + len(p.ids) - 1 for s, p in zip(seqs, batch)], device=dev)  # (B)
        edit = Intervention(pos=last, record_z=tuple(range(L)) if record_z else (),
                            record_resid=tuple(range(L)) if record_resid else (),
                            add_resid={add[0]: add[1]} if add is not None else {})
        hidden = model(idx, pad_mask=pad_mask, intervention=edit, return_hidden=True)   # (B, W, C)
        for r, p in enumerate(batch):
            # only the positions that predict answer tokens go through the 49k-wide output layer
            a = torch.arange(len(p.answer), device=dev)
            logits = lm_head_fp32(model, hidden[r, last[r] + a])                                 # (A, V)
            lp = F.log_softmax(logits, -1)[a, torch.tensor(p.answer, device=dev)]                # (A)
            p_first.append(lp[0].exp().item())
            top1.append(int(logits[0].argmax()) == p.answer[0])
            logprob.append(lp.sum().item())
        if record_z:
            zs.append(torch.stack([edit.z[l][:, 0] for l in range(L)], 1).float().cpu())      # (B, L, H, D)
        if record_resid:
            rs.append(torch.stack([edit.resid[l][:, 0] for l in range(L)], 1).float().cpu())  # (B, L, C)
    out = {"p_first": torch.tensor(p_first), "top1": torch.tensor(top1), "logprob": torch.tensor(logprob)}
    if record_z:
        out["z"] = torch.cat(zs)
    if record_resid:
        out["resid"] = torch.cat(rs)
    return out


def state_norms(model, tok, task, n: int = 32, batch_size: int = 16) -> list[float]:
    """The mean norm of the residual stream after every block at the last prompt token, over the first n
    training examples in the form train.py trains on (the chat prompt with the instruction): the scale
    an IV is added to (train.py --iv_norm_ratio). -> [L] floats."""
    seqs = [render_prompt(tok, ex) for ex in list(task.train)[:n]]
    if not seqs:
        raise ExtractError(f"task {task.name!r} has no training examples to measure the hidden-state norm on")
    L, total, dev = model.n_layers, 0.0, model_device(model)
    for i in range(0, len(seqs), batch_size):
        idx, pad_mask = pad_left(seqs[i:i + batch_size], dev)   # left padding: every last token at W - 1
        edit = Intervention(pos=torch.full((len(idx),), idx.shape[1] - 1, device=dev),
                            record_resid=tuple(range(L)))
        with torch.no_grad():
            model(idx, pad_mask=pad_mask, intervention=edit)
        resid = torch.stack([edit.resid[layer][:, 0] for layer in range(L)], 1)          # (b, L, C)
        total = total + resid.float().norm(dim=-1).sum(0)
    return [float(f"{float(x):.7g}") for x in total / len(seqs)]
