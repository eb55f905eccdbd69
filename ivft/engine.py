"""Batched inference: the summed log-prob of continuations and greedy replies for many prompts at
once (score_continuations, greedy_generate, and run_prompts under evaluate.py), each number equal to
what a plain per-example loop computes; and the fp32 output layer (lm_head_fp32) every scorer uses.
greedy_replies is evaluate's reply path on its own, for the IV check and the study's analyses; any
of them may add an intervention (an IV) at every prompt's last token.

Speed (all exact: the numbers equal a plain per-example loop; tests check each shortcut):
- Prompts of one task share a long prefix (system prompt, demonstrations, instruction). It runs
  once and its KV cache serves every row; a batch then runs only its rows' own suffixes, and that
  one prefill serves choice ranking, the gold's log-prob and greedy decoding.
- Answers are scored on top of the prompt cache, all (prompt, answer) pairs of a batch sorted by
  length; only positions whose next token is scored go through the 49k-wide output layer, in fp32
  even under bf16 autocast (bf16 logits are off by ~0.1 nats, enough to flip close choices).
- Ranking prunes: log-probs only fall as tokens are added, so an answer whose first token is
  already less likely than the whole gold cannot outrank it and is not scored further.
- Greedy decoding starts from the gold's teacher-forced pass: while the argmax agrees with the gold
  the reply is the gold; at the first disagreement the reply usually can no longer match
  (prompts.may_still_match) and needs no decoding at all. Rows still open decode token by token and
  stop as soon as every verdict is settled. One greedy reply serves both exact_match and
  reply_contains.
- Decoding is continuously batched (Decoder): rows of all tasks wait in one pool and step
  together, so the few that ramble to the budget never step alone; the KV cache grows in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ivft.prompts import reply_budgets, reply_verdicts, verdict_open
from ivft.errors import TrainError
from model import Intervention, KVCache


# ---------------------------------------------------------------------------------------------
# Precision and mode

def autocast(dtype, device_type: str = "cpu"):
    """Context for --dtype: float32 = plain, bfloat16 = torch.autocast (weights stay fp32)."""
    if dtype in (None, "float32", torch.float32):
        return contextlib.nullcontext()
    if dtype in ("bfloat16", torch.bfloat16):
        if not torch.amp.is_autocast_available(device_type):
            raise ValueError(f"bf16 autocast is not available on device {device_type!r}; use fp32")
        return torch.autocast(device_type, dtype=torch.bfloat16)
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")


def resolve_amp(dtype: str, device):
    """The autocast dtype, or None for plain fp32. auto = bf16 where the hardware has it: CUDA with
    bf16 support, or a CPU with native bf16 matmuls (AVX512-BF16 / AMX, what oneDNN reports). An
    AVX2-only CPU emulates bf16 matmuls, which is much slower than fp32, not faster."""
    if dtype == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        try:
            ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            ok = False
    if dtype == "bf16" and not ok and device.type == "cuda":
        raise TrainError("this GPU does not support bf16; use --dtype fp32")
    if dtype == "bf16":
        return torch.bfloat16   # asked for explicitly: honoured on a CPU too, slow or not
    return torch.bfloat16 if ok else None


def lm_head_fp32(model, h):
    """Logits (..., V) in fp32 for hidden states h (..., C), autocast off: the output layer runs only
    on the few positions that are scored, so full precision is cheap, and bf16 logits would move
    close scores (see the module docstring). The one output layer of every scorer, trainer and
    extractor (an fp64 model, in tests, keeps fp64)."""
    w = model.lm_head.weight
    # a device with no autocast at all (meta, the device tests' stand-in) has none to turn off
    off = torch.autocast(h.device.type, enabled=False) if torch.amp.is_autocast_available(h.device.type) \
        else contextlib.nullcontext()
    with off:
        return model.lm_head(h.to(w.dtype)).to(torch.promote_types(w.dtype, torch.float32))


def _logprobs(model, h):
    """log-softmax over the vocabulary for hidden states h (N, C) -> (N, V), fp32. (Greedy decoding
    needs only the argmax, which the logits have: it skips the softmax.)"""
    return lm_head_fp32(model, h).log_softmax(-1)


def model_device(model):
    return next(model.parameters()).device


def resolve_device(flag: str) -> torch.device:
    """The scripts' --device: auto = the first CUDA GPU where there is one, else the CPU; or a torch
    device name (cpu, cuda, cuda:1, ...). A device this machine lacks is a ValueError naming the flag."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(flag)
    except RuntimeError:
        raise ValueError(f"--device {flag}: not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {flag}: this machine (torch {torch.__version__}) has no CUDA GPU; "
                         f"use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {flag}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    return dev


def add_device_flags(g):
    """--device, --dtype (autocast) and --model_dtype (weights) as train.py has them, for the other
    scripts. Their default --dtype is fp32, not train.py's auto: auto is bf16 on GPUs and AMX CPUs,
    and a score or an IV should not change with the machine unless asked (docs/training.md)."""
    g.add_argument("--device", default="auto", help="auto (a CUDA GPU where there is one, else the CPU), "
                   "cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16"],
                   help="compute dtype: bf16 = autocast (the output layer stays fp32: lm_head_fp32); auto = "
                   "bf16 where the hardware multiplies it natively (GPUs, AMX CPUs), else fp32")
    g.add_argument("--model_dtype", default="fp32", choices=["fp32", "bf16"],
                   help="storage dtype of the weights (bf16 halves their memory)")
    return g


def resolve_precision(args, error=ValueError) -> tuple[torch.device, torch.dtype | None, torch.dtype]:
    """(device, autocast dtype or None, weight dtype) from add_device_flags' flags; a bad one raises
    `error` (the script's one-line error class). The autocast choice is train.py's (resolve_amp)."""
    try:
        dev = resolve_device(args.device)
        amp = resolve_amp(args.dtype, dev)
    except (ValueError, TrainError) as e:
        raise error(str(e)) from None
    return dev, amp, torch.bfloat16 if args.model_dtype == "bf16" else torch.float32


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the block, then back in the caller's mode (train.py evaluates
    mid-training; adapters may have dropout)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _add_time(timings, key, t0):
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------
# Prompts: a shared prefix runs once, then each batch of suffixes on top of its cache

def _common_prefix_len(seqs) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _run_shared_prefix(model, prompts):
    """Run the prompts' longest common prefix once (batch 1) -> (its length, its cache or None)."""
    # keep at least one token per row outside the prefix: its hidden state predicts the answer
    plen = min(_common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
    prefix_cache = None
    if plen:
        prefix_cache = KVCache(model.n_layers)
        model(torch.tensor([prompts[0][:plen]], device=model_device(model)), cache=prefix_cache,
              return_hidden=True)
    return plen, prefix_cache


def _cache_rows(cache: KVCache, rows=None) -> KVCache:
    """A cache that shares the tensors of `cache` (rows=None) or holds a copy of some rows. Updating
    it concatenates into new tensors, so the original is never changed."""
    new = KVCache(len(cache.k))
    for i in range(len(cache.k)):
        if cache.k[i] is not None:
            new.k[i] = cache.k[i] if rows is None else cache.k[i][rows]
            new.v[i] = cache.v[i] if rows is None else cache.v[i][rows]
    return new


def _prefill(model, suffixes, prefix_cache, prefix_len, pad_side, intervention=None):
    """Run a batch of prompt suffixes after a shared prefix (already in prefix_cache, batch 1).
    -> (cache, pad_mask (B, prefix_len + T), hidden at each row's last prompt token (B, C)).
    Padding sits between the prefix and a left-padded suffix: the model takes positions from the
    mask, so a row's numbers are those of its unpadded prompt wherever the pads are.
    intervention (pos None) acts at each row's last prompt token, which is never in the prefix."""
    dev = model_device(model)
    B, T = len(suffixes), max(len(s) for s in suffixes)
    idx = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, prefix_len + T, dtype=torch.bool)
    mask[:, :prefix_len] = True
    last = torch.empty(B, dtype=torch.long)
    for r, s in enumerate(suffixes):
        if pad_side == "left":
            idx[r, T - len(s):] = torch.tensor(s)
            mask[r, prefix_len + T - len(s):] = True
            last[r] = T - 1
        else:
            idx[r, :len(s)] = torch.tensor(s)
            mask[r, prefix_len:prefix_len + len(s)] = True
            last[r] = len(s) - 1
    cache = KVCache(model.n_layers)
    if prefix_len:
        # expand() is a view; the first update concatenates into per-row tensors
        for i in range(model.n_layers):
            cache.k[i] = prefix_cache.k[i].expand(B, -1, -1, -1)
            cache.v[i] = prefix_cache.v[i].expand(B, -1, -1, -1)
    mask = mask.to(dev)
    if intervention is not None:
        # Intervention.pos counts columns of the whole sequence, the cached prefix included
        intervention = dataclasses.replace(intervention, pos=prefix_len + last, z={}, resid={})
    h = model(idx.to(dev), pad_mask=mask, cache=cache, intervention=intervention,
              return_hidden=True)                                                # (B, T, C)
    return cache, mask, h[torch.arange(B, device=dev), last.to(dev)]             # (B, C)


def _check_last_token_edit(intervention):
    """run_prompts places an intervention at every prompt's last token, batch by batch, in its own
    order: one that names positions, reads tensors back, or holds per-row values cannot follow."""
    if intervention is None:
        return
    per_row = [v for v in intervention.add_resid.values() if v.dim() > 1] + \
              [v for d in (intervention.set_z, intervention.add_z) for _, v in d.values() if v.dim() > 2]
    if intervention.pos is not None or intervention.record_z or intervention.record_resid or per_row \
            or (torch.is_tensor(intervention.scale) and intervention.scale.dim() > 0):
        raise ValueError("run_prompts: the intervention must be an edit of every prompt at its last token: "
                         "pos None, no record_z/record_resid, one vector for all rows and a scalar scale")


# ---------------------------------------------------------------------------------------------
# Scoring continuations on top of a prefilled batch

def _score_pairs(model, cache, mask, first_lp, prow, cs):
    """Sum log P(cs[k] | prompt of batch row prow[k]) for a chunk of (row, continuation) pairs.
    first_lp (B, V) scores every continuation's first token; the rest need one forward of cont[:-1]
    on top of a copy of the prompt's cache rows (the last token's output predicts nothing we score).
    -> (float64 tensor (len(cs),), per pair the argmax token at each of its positions: what greedy
    decoding would pick there, given the continuation so far)."""
    dev = first_lp.device
    prow_t = torch.tensor(prow, device=dev)
    total = first_lp[prow_t, torch.tensor([c[0] for c in cs], device=dev)].double()
    greedy = [[t] for t in first_lp[prow_t].argmax(-1).tolist()]
    long = [k for k, c in enumerate(cs) if len(c) > 1]      # one-token answers are done already
    if not long:
        return total, greedy
    Tc = max(len(cs[k]) for k in long) - 1
    inp = torch.zeros(len(long), Tc, dtype=torch.long)
    tgt = torch.zeros(len(long), Tc, dtype=torch.long)
    cmask = torch.zeros(len(long), Tc, dtype=torch.bool)
    for q, k in enumerate(long):
        c = cs[k]
        inp[q, :len(c) - 1] = torch.tensor(c[:-1])
        tgt[q, :len(c) - 1] = torch.tensor(c[1:])
        cmask[q, :len(c) - 1] = True
    inp, tgt, cmask = inp.to(dev), tgt.to(dev), cmask.to(dev)
    rows = torch.tensor([prow[k] for k in long], device=dev)
    # copying the rows' cache (a few MB per row) costs far less than the forward itself
    sub = _cache_rows(cache, rows)
    pad_mask = torch.cat([mask[rows], cmask], dim=1)         # (N, prefix + T + Tc): right-padded answers
    h = model(inp, pad_mask=pad_mask, cache=sub, return_hidden=True)               # (N, Tc, C)
    logp = _logprobs(model, h[cmask])                                              # (M, V) M scored tokens
    lp = logp.gather(1, tgt[cmask][:, None])[:, 0]                                 # (M,)
    which = torch.tensor(long, device=dev)[:, None].expand(-1, Tc)[cmask]          # (M,) pair index
    for k, t in zip(which.tolist(), logp.argmax(-1).tolist()):                     # in position order
        greedy[k].append(t)
    return total.index_add_(0, which, lp.double()), greedy


def _score_sorted(model, cache, mask, first_lp, rows, pairs, conts, scores, chunk, greedy=None):
    """Score (batch row, continuation index) pairs into scores[rows[r]][j], sorted by length and
    chunked so that a forward pads little; greedy[rows[r]] gets the argmax tokens along conts[.][0]."""
    pairs = sorted(pairs, key=lambda rj: len(conts[rows[rj[0]]][rj[1]]))
    for c0 in range(0, len(pairs), chunk):
        part = pairs[c0:c0 + chunk]
        s, g = _score_pairs(model, cache, mask, first_lp, [r for r, _ in part],
                            [conts[rows[r]][j] for r, j in part])
        for (r, j), v, gj in zip(part, s.tolist(), g):
            scores[rows[r]][j] = v
            if j == 0 and greedy is not None:
                greedy[rows[r]] = gj


def _unbeaten(pairs, first_lp, rows, conts, scores):
    """With the golds (j = 0) scored: the pairs that might still beat their gold. The others' score
    is set to their first token's log-prob, exact for a one-token answer, else a bound already
    below the gold (log-probs only fall as tokens are added)."""
    rest = []
    for r, j in pairs:
        if j > 0:
            c = conts[rows[r]][j]
            bound = first_lp[r, c[0]].item()
            if len(c) == 1 or bound < scores[rows[r]][0]:
                scores[rows[r]][j] = bound   # exact (one token) or already beaten
            else:
                rest.append((r, j))
    return rest


def _score_batch(model, cache, mask, last_h, rows, conts, scores, prune, chunk) -> dict:
    """Score every continuation of the batch's prompts into scores (see run_prompts for prune).
    -> {prompt index: argmax tokens along its gold conts[i][0]}."""
    greedy = {}
    if any(conts[i] for i in rows):
        first_lp = _logprobs(model, last_h)                                  # (B, V)
        pairs = [(r, j) for r, i in enumerate(rows) for j in range(len(conts[i]))]
        if prune:
            _score_sorted(model, cache, mask, first_lp, rows, [(r, j) for r, j in pairs if j == 0],
                          conts, scores, chunk, greedy)
            pairs = _unbeaten(pairs, first_lp, rows, conts, scores)
        _score_sorted(model, cache, mask, first_lp, rows, pairs, conts, scores, chunk, greedy)
    return greedy


# ---------------------------------------------------------------------------------------------
# Greedy decoding: read off the gold where it can be, else continuously batched

def _greedy_from_gold(gold, argmax, max_new, stop_ids, alive):
    """Greedy decoding read off the gold's teacher-forced pass: argmax[k] is the greedy token after
    gold[:k]. While greedy agrees with the gold it walks the gold; at the first disagreement its
    reply is gold[:k] + argmax[k]. -> the reply when that settles it (it reproduced the gold through
    its end token, hit a stop token, ran out of budget, or can no longer match), else None: the row
    needs real decoding (e.g. "Cold" where the gold says "cold")."""
    toks = []
    for want, got in zip(gold, argmax):
        toks.append(got)
        if got in stop_ids or len(toks) >= max_new or (alive is not None and not alive(toks)):
            return toks
        if got != want:
            return None
    return None  # a gold without a stop token (not produced by answer_ids): decode for real


def _decode_one_token(model, nxt, mask, cache):
    """One greedy token for every row of a pool: nxt (A,) the rows' next inputs, mask (A, S) their
    pad mask -> (the tokens after them (A,), the mask grown by their position)."""
    mask = torch.cat([mask, torch.ones(len(nxt), 1, dtype=torch.bool, device=mask.device)], 1)
    h = model(nxt[:, None], pad_mask=mask, cache=cache, return_hidden=True)[:, -1]
    return lm_head_fp32(model, h).argmax(-1), mask


class PoolCache(KVCache):
    """The Decoder's cache: rows of several prompt caches stacked into one (stack), and rows dropped
    as they finish (select_rows), both keeping KVCache's room to grow in place."""

    @classmethod
    def stack(cls, parts, headroom: int = 0) -> "PoolCache":
        """One cache holding the rows of several: parts = [(cache, rows)], rows a LongTensor or None
        (all). Caches of different lengths are right-aligned: a shorter one is left-padded with
        zeros, which the caller's pad mask must hide (positions come from that mask, so a padded
        row computes what it would alone). Used to decode rows of different prompts together."""
        n_layers = len(parts[0][0].k)
        S = max(c.length for c, _ in parts)
        new = cls(n_layers, headroom)
        for i in range(n_layers):
            ks = [(c.k[i], c.v[i]) if rows is None else (c.k[i][rows], c.v[i][rows]) for c, rows in parts]
            B = sum(k.shape[0] for k, _ in ks)
            _, G, _, D = ks[0][0].shape
            kb = ks[0][0].new_empty(B, G, S + headroom, D)
            vb = ks[0][1].new_empty(B, G, S + headroom, D)
            b = 0
            for k, v in ks:
                n, pad = k.shape[0], S - k.shape[2]
                # zeros, not whatever the memory held: a masked NaN would still poison attention
                kb[b:b + n, :, :pad], vb[b:b + n, :, :pad] = 0, 0
                kb[b:b + n, :, pad:S], vb[b:b + n, :, pad:S] = k, v
                b += n
            new.k[i], new.v[i] = kb[:, :, :S], vb[:, :, :S]
            new._buf[i] = (kb, vb, new.k[i])
        return new

    def select_rows(self, rows):
        """Keep only batch rows `rows` (a row dropped from decoding). Keeps the buffers' room."""
        for i in range(len(self.k)):
            if self.k[i] is None:
                continue
            buf, S = self._buf[i], self.k[i].shape[2]
            if buf is not None and buf[2] is self.k[i]:
                kb, vb = buf[0][rows], buf[1][rows]
                self.k[i], self.v[i] = kb[:, :, :S], vb[:, :, :S]
                self._buf[i] = (kb, vb, self.k[i])
            else:
                self.k[i], self.v[i] = self.k[i][rows], self.v[i][rows]
                self._buf[i] = None


class Decoder:
    """Greedy decoding of rows from many prompt batches at once (continuous batching).

    A decoding step has a fixed cost (every weight read once, many small ops) that dominates small
    batches. Decoding each prompt batch alone, the few rows that ramble to the budget would step
    alone for many steps. So rows wait in a pool, from any batch or task, and step together once
    there are min_rows of them (finish() steps the rest). Rows of different prompt lengths share
    one left-padded cache (PoolCache.stack); positions come from the pad mask, so each row computes
    what it would alone.

    Like Transformer.generate, but starting from our prefilled caches, with the fp32 output layer,
    and ending each row at its first stop token, at its budget, or once alive(tokens) is False
    (its verdict is settled). The reply (token list) goes to sink[index]."""

    @dataclass
    class Row:
        tokens: list            # the reply so far; its last token is the row's next input
        budget: int             # most tokens to generate
        alive: object           # callable(tokens) -> False once the verdict is settled, or None
        sink: list              # where the reply goes when done: sink[index] = tokens
        index: int
        done: bool = False

    def __init__(self, model, stop_ids, min_rows: int, timings=None, progress: bool = False):
        self.model, self.stop, self.min_rows, self.timings = model, set(stop_ids), max(1, min_rows), timings
        self.progress = progress
        self.cache = self.mask = self.nxt = None    # pooled rows: cache (A, G, S, D), mask (A, S), next input (A,)
        self.rows = []                              # a Row per pooled row (done ones ride along: see step)
        self.queued = []                            # batches waiting to join: (cache, batch rows, mask, Rows)

    def _ends(self, row) -> bool:
        t = row.tokens
        return t[-1] in self.stop or len(t) >= row.budget or (row.alive is not None and not row.alive(t))

    def _deliver(self, row):
        row.sink[row.index] = row.tokens
        row.done = True

    def _live(self) -> int:
        return sum(not r.done for r in self.rows) + sum(len(q[3]) for q in self.queued)

    @torch.no_grad()
    def add(self, cache, mask, last_h, rows, sel):
        """Queue batch rows sel (LongTensor) of a prefilled batch: cache, its pad mask, and the hidden
        state of each selected row's last prompt token last_h (len(sel), C); rows[k] = (budget,
        alive or None, sink, index) for sel[k]. Steps while min_rows or more rows wait."""
        t0 = time.perf_counter()
        first = lm_head_fp32(self.model, last_h).argmax(-1).tolist()
        new, keep = [], []
        for k, ((budget, alive, sink, index), t) in enumerate(zip(rows, first)):
            row = self.Row([t], budget, alive, sink, index)
            if self._ends(row):
                self._deliver(row)      # answered in one token: never enters the pool
            else:
                new.append(row)
                keep.append(k)
        if new:
            # joined to the pool only when it steps: batches queued in between are copied once
            self.queued.append((cache, sel.to(mask.device)[torch.tensor(keep, device=mask.device)], mask, new))
        _add_time(self.timings, "generate", t0)
        while self._live() >= self.min_rows:
            self.step()

    def _join(self):
        """Move the queued rows into the pool (one copy of the pool, dropping its finished rows)."""
        live = [k for k, r in enumerate(self.rows) if not r.done]
        parts, masks, nxts, rows = [], [], [], []
        if live:
            lt = torch.tensor(live, device=self.mask.device)
            parts.append((self.cache, lt))
            masks.append(self.mask[lt])
            nxts.append(self.nxt[lt])
            rows += [self.rows[k] for k in live]
        for cache, sel, mask, new in self.queued:
            parts.append((cache, sel))
            masks.append(mask[sel])
            nxts.append(torch.tensor([r.tokens[-1] for r in new], device=mask.device))
            rows += new
        S = max(m.shape[1] for m in masks)
        # room for the longest budget: every later step writes in place
        self.cache = PoolCache.stack(parts, headroom=max(r.budget for r in rows))
        self.mask = torch.cat([torch.cat([m.new_zeros(m.shape[0], S - m.shape[1]), m], 1) for m in masks])
        self.nxt = torch.cat(nxts)
        self.rows, self.queued = rows, []

    def _append(self, tokens):
        """Give every unfinished row its new token; deliver the rows that end with it."""
        for row, t in zip(self.rows, tokens):
            if not row.done:
                row.tokens.append(t)
                if self._ends(row):
                    self._deliver(row)

    def _drop_finished(self):
        # finished rows ride along (their tokens are ignored) until a quarter of the pool has
        # finished: dropping rows copies the whole cache
        live = [k for k, r in enumerate(self.rows) if not r.done]
        if len(live) <= 3 * len(self.rows) // 4:
            if live:
                lt = torch.tensor(live, device=self.mask.device)
                self.cache.select_rows(lt)
                self.mask, self.nxt = self.mask[lt], self.nxt[lt]
                self.rows = [self.rows[k] for k in live]
            else:
                self.cache = self.mask = self.nxt = None
                self.rows = []

    @torch.no_grad()
    def step(self):
        """One token for every pooled row."""
        t0 = time.perf_counter()
        if self.queued:
            self._join()
        self.nxt, self.mask = _decode_one_token(self.model, self.nxt, self.mask, self.cache)   # (A,)
        self._append(self.nxt.tolist())
        self._drop_finished()
        _add_time(self.timings, "generate", t0)

    def finish(self):
        """Decode every pooled row to its end."""
        steps = max([r.budget - len(r.tokens) for r in self.rows if not r.done] +
                    [r.budget - 1 for q in self.queued for r in q[3]] + [0])
        with tqdm(total=steps, desc="last replies", disable=not self.progress or not steps, leave=False) as bar:
            while self._live():
                self.step()
                bar.update()


def _queue_replies(decoder, cache, mask, last_h, rows, conts, greedy, gens, max_new_tokens, stop_ids, alive):
    """The batch's greedy replies into gens: read off the gold where that settles them, the other
    rows queued in the decoder."""
    todo, todo_rows = [], []   # batch rows that need token-by-token decoding
    for r, i in enumerate(rows):
        row_alive = None if alive is None else (lambda toks, i=i: alive(i, toks))
        g = None
        if i in greedy:
            g = _greedy_from_gold(conts[i][0], greedy[i], max_new_tokens, stop_ids, row_alive)
        if g is None:
            todo.append(r)
            todo_rows.append((max_new_tokens, row_alive, gens, i))
        gens[i] = g
    if todo:
        sel = torch.tensor(todo, device=last_h.device)
        decoder.add(cache, mask, last_h[sel], todo_rows, sel)


def cut_at_stop(ids, stop_ids):
    """ids up to and including the first stop id."""
    for k, t in enumerate(ids):
        if t in stop_ids:
            return ids[:k + 1]
    return ids


# ---------------------------------------------------------------------------------------------
# The driver, and its two plain entry points

@torch.no_grad()
def run_prompts(model, prompts, conts, *, max_new_tokens=0, stop_ids=(), alive=None, prune=False,
                batch_size=32, pad_side="left", desc=None, progress=True, timings=None, tag="", decoder=None,
                intervention: Intervention | None = None):
    """For each prompt i: the summed log-prob of each continuation in conts[i], and (max_new_tokens
    > 0) its greedy continuation, cut short where alive(i, tokens) returns False. An intervention
    (model.Intervention with pos None, e.g. add_resid={layer: IV}) acts at every prompt's last token
    in the prefill, so every score and reply is taken with it, as Transformer.generate would add it;
    None (or one with nothing set) leaves every number as it is without.
    -> (scores: list[list[float]], gens: list[list[int]] | None).
    With a shared `decoder` (Decoder), rows that need decoding may still be in its pool on return:
    their gens[i] are filled in by decoder.finish().

    prune=True is for ranking against conts[i][0] (the gold): that one is scored exactly, and so is
    every other that might beat it; one whose first token's log-prob is already below the gold's
    total cannot (log-probs only fall as tokens are added), so its score is left at that bound.
    Confident models then score little more than the gold.
    With max_new_tokens and conts[i][0] given, greedy decoding starts from the gold's teacher-forced
    pass (_greedy_from_gold); only rows it leaves open are decoded token by token.

    The prompts' longest common prefix runs once (batch 1); prompts are then sorted by length (less
    padding) and batched; per batch one prefill of the suffixes serves every continuation and the
    decoding. The batch's (prompt, continuation) pairs are sorted by length and scored in chunks of
    up to 2 * batch_size rows: few forwards, little padding, wide matrix products."""
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: there is no position to predict the first answer token from")
    if any(len(c) == 0 for cs in conts for c in cs):
        raise ValueError("empty continuation")
    _check_last_token_edit(intervention)
    n = len(prompts)
    scores = [[None] * len(cs) for cs in conts]
    gens = [None] * n if max_new_tokens else None
    if n == 0:
        return scores, gens
    t0 = time.perf_counter()
    plen, prefix_cache = _run_shared_prefix(model, prompts)
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    stop_ids = set(stop_ids)
    own_decoder = max_new_tokens and decoder is None
    if own_decoder:
        decoder = Decoder(model, stop_ids, batch_size, timings)
    for rows in tqdm(batches, desc=desc, disable=not progress, leave=False):
        t0 = _add_time(timings, tag + "prefill", t0)
        cache, mask, last_h = _prefill(model, [prompts[i][plen:] for i in rows], prefix_cache, plen, pad_side,
                                       intervention)
        t0 = _add_time(timings, tag + "prefill", t0)
        greedy = _score_batch(model, cache, mask, last_h, rows, conts, scores, prune, 2 * batch_size)
        t0 = _add_time(timings, tag + "score", t0)
        if max_new_tokens:
            _queue_replies(decoder, cache, mask, last_h, rows, conts, greedy, gens, max_new_tokens, stop_ids, alive)
            t0 = time.perf_counter()
    if own_decoder:
        decoder.finish()
    return scores, gens


def score_continuations(model, prompts, conts, batch_size: int = 32, pad_side: str = "left",
                        progress: bool = False) -> list[float]:
    """Sum log P(conts[i] | prompts[i]) for each pair (natural log), batched. Pairs sharing a prompt
    share its forward pass, so many answers to one prompt cost one prompt plus their own tokens."""
    if len(prompts) != len(conts):
        raise ValueError(f"{len(prompts)} prompts but {len(conts)} continuations")
    uniq, groups, where = {}, [], []
    for p, c in zip(prompts, conts):
        key = tuple(p)
        if key not in uniq:
            uniq[key] = len(groups)
            groups.append([])
        where.append((uniq[key], len(groups[uniq[key]])))
        groups[uniq[key]].append(list(c))
    with eval_mode(model):
        scores, _ = run_prompts(model, [list(k) for k in uniq], groups, batch_size=batch_size,
                                pad_side=pad_side, progress=progress, desc="scoring")
    return [scores[g][j] for g, j in where]


def greedy_generate(model, prompts, max_new_tokens: int, stop_ids=(), batch_size: int = 32,
                    progress: bool = False, intervention: Intervention | None = None) -> list[list[int]]:
    """Greedy continuations of prompts (lists of ids), up to and including the first stop id;
    intervention: see run_prompts."""
    with eval_mode(model):
        _, gens = run_prompts(model, prompts, [[] for _ in prompts], max_new_tokens=max_new_tokens,
                              stop_ids=stop_ids, batch_size=batch_size, progress=progress, desc="generating",
                              intervention=intervention)
    return [cut_at_stop(g, stop_ids) for g in gens]


def greedy_replies(model, tok, prompts, golds, golds_text, metrics=("exact_match", "reply_contains"), *,
                   stop_ids=None, intervention: Intervention | None = None, batch_size: int = 32,
                   progress: bool = False) -> dict:
    """evaluate.py's greedy replies and their verdicts, for callers that want only those (the IV
    check, the study's analyses): the same run_prompts call evaluate makes, from the same gold
    passes, budgets and early stop (prompts.reply_budgets, verdict_open), so one model and one set of
    examples get one score everywhere. prompts and golds are id lists (golds as prompts.answer_ids
    makes them, ending in a stop token), golds_text the answers as text; stop_ids default to the
    template's. intervention: see run_prompts. -> prompts.reply_verdicts' {"text": [...], metric:
    [1.0 / 0.0 per example] for each of metrics}. The caller chooses the dtype (autocast)."""
    if not len(prompts) == len(golds) == len(golds_text):
        raise ValueError(f"{len(prompts)} prompts, {len(golds)} golds and {len(golds_text)} gold texts")
    stop = set(tok.stop_ids() if stop_ids is None else stop_ids)
    em_budget, rc_budget = reply_budgets(golds, metrics)
    if not em_budget and not rc_budget:
        raise ValueError(f"greedy_replies: no greedy metric in {list(metrics)}; "
                         f"use exact_match, reply_contains or both")
    with eval_mode(model):
        _, gens = run_prompts(model, prompts, [[g] for g in golds], max_new_tokens=max(em_budget, rc_budget),
                              stop_ids=stop, alive=verdict_open(tok, golds_text, stop, em_budget, rc_budget),
                              batch_size=batch_size, progress=progress, desc="replies",
                              intervention=intervention)
    return reply_verdicts(tok, golds_text, gens, stop, em_budget, rc_budget)
