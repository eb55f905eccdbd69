"""sample.py against a tiny random model with a 64-position context: a prompt that does not fit is
one line and exit status 2 (before, it was decoded past the context into a garbage reply, exit 0),
and a reply budget that would run past the context is lowered, saying so."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ivft.load import save_hf
from ivft.tokenizer import GPT2_PATTERN, Tokenizer
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # byte-level tokens, so a prompt of n plain characters is n tokens (--raw: no chat template)
    tok = Tokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 256}, GPT2_PATTERN,
                    merges=[], bos_id=None, eos_id=256, pad_id=256)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT)
    return save_hf(Transformer(cfg).init_weights(), tok, tmp_path_factory.mktemp("sample") / "tiny")


def sample(model_dir, prompt, *flags):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(model_dir), "--raw",
                           "--prompt", prompt, "--temperature", "0", "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=300)


def test_prompt_longer_than_the_context_is_one_line_exit_2(tiny_dir):
    r = sample(tiny_dir, "x" * (CONTEXT + 5))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --prompt is {CONTEXT + 5} tokens, but the model's context is {CONTEXT} positions, one at "
        "least for the reply: shorten it by 6 tokens or more"] and r.stdout == ""


def test_reply_budget_past_the_context_is_lowered_and_said(tiny_dir):
    r = sample(tiny_dir, "x" * (CONTEXT - 10), "--max_new_tokens", "50")
    assert r.returncode == 0, r.stderr
    assert (f"note: --max_new_tokens 50 lowered to 10: the prompt takes {CONTEXT - 10} of the model's "
            f"{CONTEXT} positions") in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("10 tokens in ")      # generated: 10 at most
