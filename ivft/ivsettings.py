"""The settings of an IV extraction (extract_iv.py): the Settings dataclass, whose key() is the IV
cache key, the model-dependent defaults of layer and K, and the one range check of an IV's block. Bad
input anywhere in an extraction (task, settings, IV file) is an errors.ExtractError."""
from __future__ import annotations

import argparse
import dataclasses

from ivft.errors import ExtractError

MIN_PROMPTS = 4       # fewer clean or corrupted prompts than this is not an average worth saving
CORRUPTIONS = ("query_only", "shuffled", "mismatched")
FORMATS = ("plain", "chat")
KINDS = ("heads", "resid")
EFFECTS = ("auto", "prob", "logprob")
METHODS = ("exact", "attribution", "naive")


def check_layer(layer: int, n_layers: int, what: str = "layer") -> int:
    """The one range check of an IV's block (extraction, an IV file, the injection layer of a run)."""
    if not 0 <= layer < n_layers:
        raise ExtractError(f"{what} {layer} is out of range: this model has blocks 0..{n_layers - 1}")
    return layer


# ---------------------------------------------------------------------------------------------
# Settings. Model-dependent defaults (top_k, layer) stay None until a model is known.

def default_top_k(n_heads_total: int) -> int:
    # Chosen by the dev-split sweep on SmolLM2-135M (experiments/iv_layers.py, README): K = 40 of its
    # 270 heads restores the most (K = 3, this code's old default, a third as much; 60-120 no more).
    # Todd keeps 10 of Llama-2-7B's 1,024. Other models get the same share of their heads, at least
    # 3 (1,024 heads -> 152): a guess from one model, so `--layer auto` sweeps K too.
    return max(3, round(n_heads_total * 40 / 270))


def default_layer(n_layers: int) -> int:
    # Chosen by the same sweep: after block 17 of SmolLM2's 30, i.e. 0.57 of the depth (Todd's 0.3,
    # block 9, carries about half as much here). Other models: the same share, or `--layer auto`.
    return int(n_layers * 0.57)


@dataclasses.dataclass
class Settings:
    n_clean: int = 50              # clean prompts averaged into z̄ (fewer if the train split is smaller)
    n_corrupt: int = 25            # corrupted prompts averaged into the AIE
    n_dev: int = 32                # training examples held out for the layer / K sweep (at most 1/4)
    shots: int = 10                # demonstrations in each clean prompt, each with the instruction
    format: str = "plain"          # "plain": "Q: <instruction + input>\nA: <answer>"; "chat": chat turns
    corrupt: str = "query_only"    # how the instruction's signal is removed (see corrupted_prompts)
    mismatch_task: str | None = None  # task lending its instruction for corrupt="mismatched" (None: first other)
    effect: str = "auto"           # "prob": P(first answer token); "logprob": log P(whole answer); "auto"
    method: str = "exact"          # "exact" (fast patching), "attribution" (gradient), "naive" (Todd's loop)
    kind: str = "heads"            # "heads": the paper's IV; "resid": mean residual difference
    top_k: int | None = None       # heads in the IV; None = default_top_k(L * H)
    layer: int | str | None = None  # the IV is added after this block; None = default_layer(L); "auto" = sweep
    seed: int = 0                  # picks the examples; everything else is deterministic
    batch_size: int = 16           # prompts per forward when scoring / recording (speed only)
    max_rows: int = 512            # patched rows per batch in aie_exact and the sweep (memory only)

    # settings that change speed or memory but not the result: left out of the cache key
    NOT_IN_KEY = ("batch_size", "max_rows")

    def __post_init__(self):
        choices = {"corrupt": CORRUPTIONS, "format": FORMATS, "kind": KINDS, "effect": EFFECTS,
                   "method": METHODS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ExtractError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.n_clean < MIN_PROMPTS or self.n_corrupt < MIN_PROMPTS:
            raise ExtractError(f"n_clean={self.n_clean}, n_corrupt={self.n_corrupt}: need at least "
                               f"{MIN_PROMPTS} prompts of each to average over")
        if self.shots < 0 or self.n_dev < 0:
            raise ExtractError(f"shots={self.shots}, n_dev={self.n_dev}: must be >= 0")
        if self.corrupt == "shuffled" and self.shots < 2:
            raise ExtractError("corrupt=shuffled permutes the demonstrations' answers: it needs shots >= 2")
        if self.top_k is not None and self.top_k < 1:
            raise ExtractError(f"top_k={self.top_k}: must be >= 1")
        if isinstance(self.layer, str) and self.layer != "auto":
            raise ExtractError(f"layer={self.layer!r}: expected a block number or 'auto'")
        if self.layer == "auto" and self.n_dev < MIN_PROMPTS:
            raise ExtractError(f"layer=auto sweeps on the dev split: it needs n_dev >= {MIN_PROMPTS}")
        if self.batch_size < 1 or self.max_rows < 1:
            raise ExtractError("batch_size and max_rows must be >= 1")

    def resolve(self, model) -> "Settings":
        """Fill in the model-dependent defaults and check them against the model ("auto" stays)."""
        L, H = model.n_layers, model.config.num_attention_heads
        s = dataclasses.replace(self, top_k=self.top_k or default_top_k(L * H),
                                layer=default_layer(L) if self.layer is None else self.layer)
        if s.layer != "auto":
            check_layer(s.layer, L)
        if s.top_k > L * H:
            raise ExtractError(f"top_k={s.top_k} exceeds the model's {L * H} heads")
        return s

    def key(self) -> dict:
        """The cache key. A heads IV is the same vector wherever it is added (a sum of head outputs),
        so its layer is a use-time choice, not part of the key; a resid IV is read at its layer,
        and layer "auto" chooses layer and K, so for those the layer is part of it."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NOT_IN_KEY}
        if self.kind == "heads" and self.layer != "auto":
            del out["layer"]
        return out


def layer_arg(v: str):
    """argparse type of extract_iv.py --layer: a block number or 'auto'."""
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block number or 'auto', got {v!r}") from None
