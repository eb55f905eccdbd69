"""Tests for ivft/drift.py on tiny random models: the original's replies are cached by what they depend
on; KL(original || tuned) is 0 for the same model and, for a perturbed one, positive and equal to a
naive per-position computation on each unpadded sequence alone."""
import json

import pytest
import torch

from ivft import drift
from toys import TOK, tiny_model

PROMPTS = ["how do i boil an egg?", "name a fruit.", "what is rain?", "say hi", "why do cats purr?"]


def perturbed(model, seed=1, scale=0.05):
    torch.manual_seed(seed)
    other = tiny_model()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other.eval()


def naive_kl(original, tuned, prompt_ids, reply_ids):
    """Per sequence, one unbatched full forward of each model; KL at each reply position by the
    definition, in float64."""
    sums = []
    for p, r in zip(prompt_ids, reply_ids):
        x = torch.tensor([list(p) + list(r)])
        lo = original(x)[0].double().log_softmax(-1)
        lt = tuned(x)[0].double().log_softmax(-1)
        total = 0.0
        for t in range(len(r)):                      # position len(p)-1+t predicts r[t]
            pos = len(p) - 1 + t
            total += sum(lo[pos, v].exp().item() * (lo[pos, v] - lt[pos, v]).item() for v in range(lo.shape[1]))
        sums.append(total)
    return sums


def test_kl_is_zero_for_the_same_model_and_matches_naive_for_a_perturbed_one(tmp_path):
    model = tiny_model()
    rep = drift.original_replies(model, TOK, PROMPTS, tmp_path, max_new_tokens=12, batch_size=2)
    assert all(1 <= len(r) <= 12 for r in rep["reply_ids"])
    same = drift.drift_kl(model, model, rep["prompt_ids"], rep["reply_ids"], batch_size=2)
    assert same["kl_per_token"] == 0.0 and same["kl_sum"] == [0.0] * len(PROMPTS)
    other = perturbed(model)
    got = drift.drift_kl(model, other, rep["prompt_ids"], rep["reply_ids"], batch_size=3)
    want = naive_kl(model, other, rep["prompt_ids"], rep["reply_ids"])
    diff = max(abs(a - b) for a, b in zip(got["kl_sum"], want))
    assert diff < 1e-4, f"max |batched - naive| = {diff:.2e}"
    assert all(v > 0 for v in got["kl_sum"])
    assert got["tokens"] == [len(r) for r in rep["reply_ids"]]
    assert got["kl_per_token"] == pytest.approx(sum(want) / sum(got["tokens"]), rel=1e-5)
    # a bigger change moves the distributions further
    assert drift.drift_kl(model, perturbed(model, scale=0.2), rep["prompt_ids"], rep["reply_ids"])["kl_per_token"] \
        > got["kl_per_token"]


def test_replies_are_the_models_greedy_replies_and_are_cached_by_model_and_prompts(tmp_path, monkeypatch):
    model = tiny_model()
    rep = drift.original_replies(model, TOK, PROMPTS[:2], tmp_path, max_new_tokens=8)
    ids = TOK.render_chat([{"role": "user", "content": PROMPTS[0]}])
    # the same reply as the model's own generate (greedy, KV cache, one prompt alone)
    want = model.generate(torch.tensor([ids]), 8, stop_ids=TOK.stop_ids())[0].tolist()
    stop = next((k for k, t in enumerate(want) if t in TOK.stop_ids()), len(want) - 1)
    assert rep["prompt_ids"][0] == ids and rep["reply_ids"][0] == want[:stop + 1]
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == rep["key"]
    # a second call reads the file: no generation at all
    monkeypatch.setattr(drift, "greedy_generate", lambda *a, **k: pytest.fail("regenerated a cached reply"))
    assert drift.original_replies(model, TOK, PROMPTS[:2], tmp_path, max_new_tokens=8) == rep
    monkeypatch.undo()
    # other weights, other prompts or another budget: another file
    drift.original_replies(perturbed(model), TOK, PROMPTS[:2], tmp_path, max_new_tokens=8)
    drift.original_replies(model, TOK, PROMPTS[1:3], tmp_path, max_new_tokens=8)
    drift.original_replies(model, TOK, PROMPTS[:2], tmp_path, max_new_tokens=9)
    assert len(list(tmp_path.iterdir())) == 4


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(drift.DriftError, match="make_ifeval"):
        drift.load_everyday(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(drift.DriftError, match=r"e.jsonl:1: .*'prompt'"):
        drift.load_everyday(tmp_path / "e.jsonl")
    model = tiny_model()
    with pytest.raises(ValueError, match="2 prompts but 1 replies"):
        drift.drift_kl(model, model, [[1, 2], [3]], [[4]])
    assert len(drift.load_everyday(n=60)) == 60 and len(drift.load_everyday()) >= 200
