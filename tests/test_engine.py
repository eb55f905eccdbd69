"""Tests for ivft/engine.py: the batched scoring and decoding engine against a plain per-example
loop and Transformer.generate. All models are tiny and random; runs in seconds."""
import pytest
import torch

from ivft import engine
from model import Intervention, KVCache
from toys import TOK, V, naive_score, tiny_model


# ---- scoring continuations ------------------------------------------------------------------------

def random_pairs(n_prompts=7, seed=1, odd_one=True):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, V, (5,), generator=g).tolist()  # a common prefix, as prompts of a task have
    prompts, conts = [], []
    for i in range(n_prompts):
        p = shared + torch.randint(3, V, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        if i == 3 and odd_one:
            p = torch.randint(3, V, (4,), generator=g).tolist()  # one prompt shares nothing
        for _ in range(1 + i % 3):  # several answers per prompt, of different lengths
            prompts.append(p)
            conts.append(torch.randint(0, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist())
    return prompts, conts


@pytest.mark.parametrize("batch_size,odd_one", [(1, True), (3, True), (16, True), (3, False)])
def test_score_continuations_equals_naive_loop(batch_size, odd_one):
    # odd_one=False: all prompts share a 5-token prefix, which then runs once (the cached-prefix path)
    model = tiny_model()
    prompts, conts = random_pairs(odd_one=odd_one)
    got = engine.score_continuations(model, prompts, conts, batch_size=batch_size)
    ref = [naive_score(model, p, c) for p, c in zip(prompts, conts)]
    diff = max(abs(a - b) for a, b in zip(got, ref))
    assert diff < 1e-5, f"batched vs naive: max abs diff {diff:.2e}\n{got}\n{ref}"


@pytest.mark.parametrize("odd_one", [True, False])
def test_score_continuations_left_equals_right_padding(odd_one):
    model = tiny_model(seed=3)
    prompts, conts = random_pairs(seed=4, odd_one=odd_one)
    left = engine.score_continuations(model, prompts, conts, batch_size=4, pad_side="left")
    right = engine.score_continuations(model, prompts, conts, batch_size=4, pad_side="right")
    diff = max(abs(a - b) for a, b in zip(left, right))
    assert diff < 1e-5, f"left vs right padding: max abs diff {diff:.2e}"  # fp32 rounding only


def test_score_continuations_bf16_close_to_fp32():
    model = tiny_model(seed=5)
    prompts, conts = random_pairs(seed=6)
    ref = engine.score_continuations(model, prompts, conts)
    with engine.autocast("bfloat16"):
        got = engine.score_continuations(model, prompts, conts)
    diff = max(abs(a - b) for a, b in zip(got, ref))
    assert 0 < diff < 0.05 * max(abs(x) for x in ref), f"bf16 vs fp32: max abs diff {diff:.3e}"


def test_pruned_ranking_decides_like_full_scoring():
    # prune=True may leave a wrong answer at its first-token bound; the verdict "gold strictly first"
    # and the gold's own score must not change, and a bound must really be above the exact score
    model = tiny_model(seed=9)
    g = torch.Generator().manual_seed(10)
    prompts = [[7, 8, 9] + torch.randint(3, V, (3,), generator=g).tolist() for _ in range(12)]
    conts = [[torch.randint(3, V, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
              for _ in range(5)] for _ in prompts]
    full, _ = engine.run_prompts(model, prompts, conts, batch_size=4, progress=False)
    pruned, _ = engine.run_prompts(model, prompts, conts, batch_size=4, prune=True, progress=False)
    n_pruned = 0
    for f, p in zip(full, pruned):
        assert p[0] == pytest.approx(f[0], abs=1e-6)
        assert all(f[0] > x for x in f[1:]) == all(p[0] > x for x in p[1:])
        for a, b in zip(f[1:], p[1:]):
            assert b == pytest.approx(a, abs=1e-6) or (b > a and b < p[0])
            n_pruned += b != pytest.approx(a, abs=1e-6)
    assert n_pruned > 0  # the case under test occurred


# ---- greedy decoding ------------------------------------------------------------------------------

def test_decoding_from_the_gold_equals_plain_decoding():
    # exact match reads greedy replies off the gold's teacher-forced pass where it can; the replies
    # must be those of token-by-token decoding, for golds greedy follows to a stop token, follows
    # partly, or leaves at once, with and without an early-stop rule
    model = tiny_model(seed=12)
    prompts = [[7, 8] + [9 + i, 20 + 3 * i] for i in range(8)]
    _, free = engine.run_prompts(model, prompts, [[] for _ in prompts], max_new_tokens=6, progress=False)
    stop = {free[0][2], free[1][1]}                       # stop tokens greedy really emits
    plain_kw = dict(max_new_tokens=6, stop_ids=stop, batch_size=3, progress=False)
    for alive in (None, lambda i, toks: len(toks) < 2 + i % 3):
        _, plain = engine.run_prompts(model, prompts, [[] for _ in prompts], alive=alive, **plain_kw)
        own = [g if g[-1] in stop else g + [2] for g in plain]
        golds = {"own reply": own, "last token changed": [g[:-1] + [(g[-1] + 1) % V] for g in own],
                 "unrelated": [[5, 6, 2] for _ in own]}
        for what, gold in golds.items():
            _, guided = engine.run_prompts(model, prompts, [[g] for g in gold], alive=alive, **plain_kw)
            assert guided == plain, f"{what} (alive={alive is not None}): {guided} != {plain}"
    assert any(g[-1] in stop for g in plain)  # the stop-token path was exercised


@pytest.mark.parametrize("odd_one", [True, False])
def test_greedy_generate_matches_model_generate(odd_one):
    model = tiny_model(seed=7)
    prompts, _ = random_pairs(seed=8, odd_one=odd_one)
    prompts = list(dict.fromkeys(map(tuple, prompts)))
    prompts = [list(p) for p in prompts]
    stop = {5, 9}
    got = engine.greedy_generate(model, prompts, 6, stop_ids=stop, batch_size=3)
    for p, g in zip(prompts, got):
        ref = model.generate(torch.tensor([p]), 6, stop_ids=stop)[0].tolist()
        assert g == engine.cut_at_stop(ref, stop), f"prompt {p}: ours {g}, generate {ref}"


def test_shared_decoder_pools_prompt_groups_exactly():
    # the decoder pool joins rows of separately prefilled groups (tasks) whose prompts differ in
    # length: a left-padded cache under a False mask. Every reply must equal plain generation.
    model = tiny_model(seed=5)
    stop = TOK.stop_ids()
    g = torch.Generator().manual_seed(3)
    groups = []
    for prefix_len, n in ((4, 5), (30, 4)):
        prefix = torch.randint(3, V, (prefix_len,), generator=g).tolist()
        groups.append([prefix + torch.randint(3, V, (int(torch.randint(1, 6, (1,), generator=g)),),
                                              generator=g).tolist() for _ in range(n)])
    want = [[engine.cut_at_stop(model.generate(torch.tensor([p]), 12, stop_ids=stop)[0].tolist(), stop) for p in ps] for ps in groups]
    assert len({len(w) for ws in want for w in ws}) > 1   # rows end at different steps
    for bs in (2, 64):   # pools that step while groups arrive; one pool holding everything
        dec = engine.Decoder(model, stop, bs)
        gens = [engine.run_prompts(model, ps, [[] for _ in ps], max_new_tokens=12, stop_ids=stop, batch_size=bs,
                               progress=False, decoder=dec)[1] for ps in groups]
        dec.finish()
        assert [[engine.cut_at_stop(x, stop) for x in gs] for gs in gens] == want, bs


def test_pool_cache_select_rows_keeps_the_rest_and_its_room():
    # the decoder drops finished rows from its pool: the others go on as if alone, and the cache
    # keeps the room it had grown, so later steps still write in place
    model = tiny_model()
    idx = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = engine.PoolCache(model.n_layers, headroom=8)
        model(idx[:, :4], cache=cache)
        model(idx[:, 4:6], cache=cache)                  # grown into a buffer with room to spare
        room = cache._buf[0][0].shape[2]
        cache.select_rows(torch.tensor([2, 0]))
        got = model(idx[[2, 0], 6:7], cache=cache)[:, -1]
        want = model(idx[[2, 0], :7])[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cache.k[0].shape[0] == 2 and cache._buf[0][0].shape[2] == room


def test_pool_cache_stack_left_pads_rows_of_different_lengths():
    # the decoder pools rows of different prompts: the shorter cache is left-padded with zeros
    # under a False mask, and each row must compute what it computes alone
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    a_idx, b_idx = torch.randint(3, V, (2, 5), generator=g), torch.randint(3, V, (3, 8), generator=g)
    with torch.no_grad():
        a, b = KVCache(model.n_layers), KVCache(model.n_layers)
        model(a_idx, cache=a)
        model(b_idx, cache=b)
        both = engine.PoolCache.stack([(a, None), (b, torch.tensor([2, 0]))], headroom=2)
        assert both.length == 8 and both.k[0].shape[0] == 4
        assert not both.k[1][:2, :, :3].any() and not both.v[1][:2, :, :3].any()   # zeros, not garbage
        mask = torch.ones(4, 8, dtype=torch.bool)
        mask[:2, :3] = False
        nxt = torch.randint(3, V, (4, 2), generator=g)
        got = [model(nxt[:, :1], pad_mask=torch.cat([mask, torch.ones(4, 1, dtype=torch.bool)], 1), cache=both)]
        got.append(model(nxt[:, 1:], pad_mask=torch.cat([mask, torch.ones(4, 2, dtype=torch.bool)], 1), cache=both))
        got = torch.cat(got, 1)                                              # (4, 2, V)
        want_a = model(torch.cat([a_idx, nxt[:2]], 1))[:, 5:]
        want_b = model(torch.cat([b_idx[[2, 0]], nxt[2:]], 1))[:, 8:]
    torch.testing.assert_close(got[:2], want_a, atol=1e-5, rtol=0)     # padded rows
    torch.testing.assert_close(got[2:], want_b, atol=1e-5, rtol=0)     # unpadded rows


# ---- an intervention at every prompt's last token (the IV of the check and the study) -------------------

def iv_edit(model, layer=1, scale=1.0, seed=11):
    g = torch.Generator().manual_seed(seed)
    return Intervention(add_resid={layer: 3 * torch.randn(model.config.hidden_size, generator=g)}, scale=scale)


@pytest.mark.parametrize("odd_one", [True, False])
def test_intervention_acts_at_each_prompts_last_token(odd_one):
    # replies and scores with the IV equal a plain per-example loop that adds it at the last prompt
    # token, with and without a shared prefix (the IV's column is then counted past the prefix)
    model = tiny_model(seed=7)
    prompts, conts = random_pairs(seed=8, odd_one=odd_one)
    uniq = [list(p) for p in dict.fromkeys(map(tuple, prompts))]
    stop = {5, 9}
    edit = iv_edit(model)

    def at_last(p):
        return Intervention(pos=torch.tensor([len(p) - 1]), add_resid=edit.add_resid)

    got = engine.greedy_generate(model, uniq, 6, stop_ids=stop, batch_size=3, intervention=edit)
    want = [engine.cut_at_stop(model.generate(torch.tensor([p]), 6, stop_ids=stop,
                                              intervention=at_last(p))[0].tolist(), stop) for p in uniq]
    assert got == want
    assert got != engine.greedy_generate(model, uniq, 6, stop_ids=stop, batch_size=3)   # the IV acts
    scores, _ = engine.run_prompts(model, prompts, [[c] for c in conts], batch_size=3, progress=False,
                                   intervention=edit)
    for p, c, (s,) in zip(prompts, conts, scores):
        with torch.no_grad():
            logp = model(torch.tensor([p + c]), intervention=at_last(p)).float().log_softmax(-1)[0]
        ref = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c))
        assert s == pytest.approx(ref, abs=1e-5), f"prompt {p}: ours {s}, per-example loop {ref}"


def test_intervention_at_scale_zero_equals_none():
    # the same scores and replies, bit for bit, and through the gold-guided decoding of greedy_replies
    model = tiny_model(seed=12)
    prompts = [[7, 8] + [9 + i, 20 + 3 * i] for i in range(8)]
    golds = [[10 + i, 2] for i in range(8)]
    kw = dict(max_new_tokens=6, stop_ids=TOK.stop_ids(), batch_size=3, progress=False)
    none = engine.run_prompts(model, prompts, [[g] for g in golds], **kw)
    zero = engine.run_prompts(model, prompts, [[g] for g in golds], intervention=iv_edit(model, scale=0.0),
                              **kw)
    assert zero == none
    one = engine.run_prompts(model, prompts, [[g] for g in golds], intervention=iv_edit(model), **kw)
    assert one[0] != none[0]
    texts = [TOK.decode(g[:-1]) for g in golds]
    assert engine.greedy_replies(model, TOK, prompts, golds, texts, intervention=iv_edit(model, scale=0.0)) \
        == engine.greedy_replies(model, TOK, prompts, golds, texts)


def test_intervention_that_cannot_follow_the_batches_is_refused():
    model = tiny_model()
    for bad in (Intervention(pos=torch.tensor([1]), add_resid={0: torch.zeros(32)}),
                Intervention(record_resid=(0,)), Intervention(add_resid={0: torch.zeros(2, 32)}),
                Intervention(add_resid={0: torch.zeros(32)}, scale=torch.ones(2))):
        with pytest.raises(ValueError, match="last token"):
            engine.run_prompts(model, [[5, 6]], [[[7]]], progress=False, intervention=bad)


# ---- bad input ------------------------------------------------------------------------------------

def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty continuation"):
        engine.score_continuations(model, [[5, 6]], [[]])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.score_continuations(model, [[]], [[5]])
