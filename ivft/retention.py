"""Per-task retention, the robust endpoints built on it, and bootstrap standard errors over items.

retention of a task = (tuned score - chance) / (base score - chance): the fraction of the original
model's ability above chance that the tuned model keeps (chance 0: the plain fraction of the base
score). Scores are means of per-item results (1.0/0.0 verdicts, or any per-item number) on the same
items before and after, so the bootstrap resamples items *paired*: one draw of item indices per task
serves both models.

Endpoints over tasks (a mean over tasks can be carried by one task that keeps a lot while the others
drop to the floor; these cannot):
- median_retention: the median of the per-task retentions;
- tasks_kept: how many tasks keep at least `keep` (default half) of their base score;
- mean_retention, next to them, for comparison.
Every endpoint comes with a bootstrap SE: items are resampled within each task (the task set is fixed:
it is the design, not a sample), B times with a fixed seed, and the SE is the standard deviation of
the endpoint over the B replicates (Efron & Tibshirani 1993, ch. 6).
"""
from __future__ import annotations

import warnings
import zlib

import numpy as np

N_BOOT = 1000
KEEP = 0.5


def _rng(seed: int, name: str) -> np.random.Generator:
    # one stream per task, named by it: adding a task does not change another task's draws
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _as_items(name, base, tuned):
    b, t = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if b.ndim != 1 or b.shape != t.shape or len(b) == 0:
        raise ValueError(f"task {name!r}: base and tuned need the same non-empty list of per-item results "
                         f"(got {b.shape} and {t.shape})")
    return b, t


def retention(base: np.ndarray, tuned: np.ndarray, chance: float = 0.0) -> np.ndarray:
    """(tuned - chance) / (base - chance), elementwise; nan where the base is not above chance (nothing
    to keep: no fraction is defined)."""
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base > chance, (tuned - chance) / (base - chance), np.nan)


def endpoints_of(ret: np.ndarray, keep: float = KEEP) -> dict:
    """The endpoints from retentions ret (..., tasks): arrays over the leading axes (a replicate
    axis in the bootstrap). nan retentions (a base at chance) are left out of each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # an all-nan slice gives nan, as it should
        return {"median_retention": np.nanmedian(ret, axis=-1), "mean_retention": np.nanmean(ret, axis=-1),
                "tasks_kept": (ret >= keep).sum(axis=-1).astype(np.float64)}


def retention_report(base_items: dict, tuned_items: dict, chance: dict | None = None, keep: float = KEEP,
                     n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Per task and overall, each number with its bootstrap SE:
    {"per_task": {task: {"n", "base", "tuned", "retention": {"value", "se"}, ...}},
     "endpoints": {"median_retention" | "mean_retention" | "tasks_kept": {"value", "se"}},
     "settings": {"keep", "n_boot", "seed", "tasks"}}.
    base_items / tuned_items: {task: per-item results on the same items, in the same order};
    chance: {task: chance level} (missing = 0)."""
    if set(base_items) != set(tuned_items):
        raise ValueError(f"tasks differ: base has {sorted(base_items)}, tuned has {sorted(tuned_items)}")
    if not base_items:
        raise ValueError("retention_report: no tasks")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2 (a standard deviation needs two replicates), got {n_boot}")
    chance = chance or {}
    names = list(base_items)
    per_task, ret_hat, ret_boot = {}, [], []
    for name in names:
        b, t = _as_items(name, base_items[name], tuned_items[name])
        c = float(chance.get(name, 0.0))
        idx = _rng(seed, name).integers(0, len(b), size=(n_boot, len(b)))      # (B, n) paired draws
        b_rep, t_rep = b[idx].mean(1), t[idx].mean(1)                          # (B,)
        r_hat, r_rep = float(retention(b.mean(), t.mean(), c)), retention(b_rep, t_rep, c)
        ret_hat.append(r_hat)
        ret_boot.append(r_rep)
        per_task[name] = {"n": len(b), "chance": c, "base": _est(b.mean(), b_rep), "tuned": _est(t.mean(), t_rep),
                          "retention": _est(r_hat, r_rep)}
    hat = endpoints_of(np.array(ret_hat), keep)
    boot = endpoints_of(np.stack(ret_boot, axis=1), keep)                      # (B, tasks) -> (B,)
    return {"per_task": per_task, "endpoints": {k: _est(float(hat[k]), boot[k]) for k in hat},
            "settings": {"keep": keep, "n_boot": n_boot, "seed": seed, "tasks": names}}


def _est(value, replicates) -> dict:
    """{"value", "se"}: se over the replicates where the statistic is defined (None if under two)."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[~np.isnan(r)]
    value = None if value is None or np.isnan(value) else float(value)
    return {"value": value, "se": float(r.std(ddof=1)) if len(r) >= 2 else None}


def mean_se(items, n_boot: int = N_BOOT, seed: int = 0, name: str = "mean") -> dict:
    """{"value", "se"} of the mean of per-item results (e.g. IF per-prompt verdicts), bootstrapped."""
    return ratio_se(items, np.ones(len(items)), n_boot, seed, name)


def ratio_se(num, den, n_boot: int = N_BOOT, seed: int = 0, name: str = "ratio") -> dict:
    """{"value", "se"} of sum(num) / sum(den) over items, items resampled as pairs (num_i, den_i):
    e.g. drift's KL per token (per-prompt KL sums over per-prompt token counts), or IF's
    instruction-level score (constraints followed over constraints, per prompt)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.ndim != 1 or num.shape != den.shape or len(num) == 0 or den.sum() <= 0:
        raise ValueError(f"{name}: need matching non-empty per-item lists with a positive denominator")
    idx = _rng(seed, name).integers(0, len(num), size=(n_boot, len(num)))
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = num[idx].sum(1) / den[idx].sum(1)
    return _est(float(num.sum() / den.sum()), reps)
