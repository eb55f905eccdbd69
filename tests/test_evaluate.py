"""Tests for evaluate.py: the batched scoring engine against a plain per-example loop, metrics on
models whose log-probabilities are known in closed form, the continual-learning summary on a
hand-made matrix, and bad input. All models are tiny and random or hand-set; runs in seconds."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evaluate as E  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from ivft.tasks import Example, Task  # noqa: E402


# ---- a character-level tokenizer with a ChatML-style template --------------------------------------
# Every character is one token, so hand computations can follow the ids.

class CharTok:
    chars = "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'-\""
    special_tokens = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    bos_id, eos_id, pad_id = 1, 2, 2
    chat_format = "chatml"

    def encode(self, text):
        return [3 + self.chars.index(c) for c in text]

    def decode(self, ids):
        names = {i: t for t, i in self.special_tokens.items()}
        # ids past the alphabet (a random model may emit them) decode as U+FFFD, like stray bytes
        return "".join(names[i] if i < 3 else (self.chars + "\ufffd" * V)[i - 3] for i in ids)

    def render_chat(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            ids += [1] + self.encode(f"{m['role']}\n{m['content']}") + [2] + self.encode("\n")
        if add_generation_prompt:
            ids += [1] + self.encode("assistant\n")
        return ids

    def stop_ids(self):
        return {0, 2}


TOK = CharTok()
V = 80  # >= 3 + len(CharTok.chars)


def tiny_model(seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    return Transformer(cfg).init_weights(std=0.2).eval()


def bigram_model(logit_table: dict):
    """A model whose next-token logits depend only on the current token: logits(next | cur) =
    L[cur], with L zero except for logit_table {(cur_char, next_char): value}. The block's attention
    and MLP write nothing (o_proj, down_proj = 0), the embedding is the identity (C = V), RMSNorm
    maps e_i to sqrt(V)·e_i, so lm_head.weight = L^T / sqrt(V) gives exactly those logits."""
    cfg = ModelConfig(vocab_size=V, hidden_size=V, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, head_dim=8, norm_eps=0.0)  # eps 0: exact sqrt(V) scale
    m = Transformer(cfg).init_weights()
    L = torch.zeros(V, V)
    for (cur, nxt), value in logit_table.items():
        L[tid(cur), tid(nxt)] = value
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.eye(V))
        m.model.layers[0].self_attn.o_proj.weight.zero_()
        m.model.layers[0].mlp.down_proj.weight.zero_()
        m.lm_head.weight.copy_(L.T / math.sqrt(V))
    return m.eval(), L


def tid(ch):
    return 2 if ch == "E" else TOK.encode(ch)[0]  # "E" stands for <|im_end|> in the tables below


def lp(L, cur, nxt):
    """log P(nxt | cur) by hand: L[cur, nxt] - log(sum_k exp L[cur, k])."""
    row = L[tid(cur)].tolist()
    return row[tid(nxt)] - math.log(sum(math.exp(x) for x in row))


def naive_score(model, prompt, cont):
    with torch.no_grad():
        logp = model(torch.tensor([prompt + cont])).float().log_softmax(-1)[0]
    return sum(logp[len(prompt) - 1 + k, c].item() for k, c in enumerate(cont))


def make_task(test, train=(), name="toy", metric="choice"):
    return Task(name=name, kind="test", metric=metric, train=list(train), test=list(test), description="toy task")


# ---- the scoring engine ---------------------------------------------------------------------------

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
    got = E.score_continuations(model, prompts, conts, batch_size=batch_size)
    ref = [naive_score(model, p, c) for p, c in zip(prompts, conts)]
    diff = max(abs(a - b) for a, b in zip(got, ref))
    assert diff < 1e-5, f"batched vs naive: max abs diff {diff:.2e}\n{got}\n{ref}"


@pytest.mark.parametrize("odd_one", [True, False])
def test_score_continuations_left_equals_right_padding(odd_one):
    model = tiny_model(seed=3)
    prompts, conts = random_pairs(seed=4, odd_one=odd_one)
    left = E.score_continuations(model, prompts, conts, batch_size=4, pad_side="left")
    right = E.score_continuations(model, prompts, conts, batch_size=4, pad_side="right")
    diff = max(abs(a - b) for a, b in zip(left, right))
    assert diff < 1e-5, f"left vs right padding: max abs diff {diff:.2e}"  # fp32 rounding only


def test_score_continuations_bf16_close_to_fp32():
    model = tiny_model(seed=5)
    prompts, conts = random_pairs(seed=6)
    ref = E.score_continuations(model, prompts, conts)
    with E.autocast("bfloat16"):
        got = E.score_continuations(model, prompts, conts)
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
    full, _ = E._run_prompts(model, prompts, conts, batch_size=4, progress=False)
    pruned, _ = E._run_prompts(model, prompts, conts, batch_size=4, prune=True, progress=False)
    n_pruned = 0
    for f, p in zip(full, pruned):
        assert p[0] == pytest.approx(f[0], abs=1e-6)
        assert all(f[0] > x for x in f[1:]) == all(p[0] > x for x in p[1:])
        for a, b in zip(f[1:], p[1:]):
            assert b == pytest.approx(a, abs=1e-6) or (b > a and b < p[0])
            n_pruned += b != pytest.approx(a, abs=1e-6)
    assert n_pruned > 0  # the case under test occurred


def test_decoding_from_the_gold_equals_plain_decoding():
    # exact match reads greedy replies off the gold's teacher-forced pass where it can; the replies
    # must be those of token-by-token decoding, for golds greedy follows to a stop token, follows
    # partly, or leaves at once, with and without an early-stop rule
    model = tiny_model(seed=12)
    prompts = [[7, 8] + [9 + i, 20 + 3 * i] for i in range(8)]
    _, free = E._run_prompts(model, prompts, [[] for _ in prompts], max_new_tokens=6, progress=False)
    stop = {free[0][2], free[1][1]}                       # stop tokens greedy really emits
    plain_kw = dict(max_new_tokens=6, stop_ids=stop, batch_size=3, progress=False)
    for alive in (None, lambda i, toks: len(toks) < 2 + i % 3):
        _, plain = E._run_prompts(model, prompts, [[] for _ in prompts], alive=alive, **plain_kw)
        own = [g if g[-1] in stop else g + [2] for g in plain]
        golds = {"own reply": own, "last token changed": [g[:-1] + [(g[-1] + 1) % V] for g in own],
                 "unrelated": [[5, 6, 2] for _ in own]}
        for what, gold in golds.items():
            _, guided = E._run_prompts(model, prompts, [[g] for g in gold], alive=alive, **plain_kw)
            assert guided == plain, f"{what} (alive={alive is not None}): {guided} != {plain}"
    assert any(g[-1] in stop for g in plain)  # the stop-token path was exercised


@pytest.mark.parametrize("odd_one", [True, False])
def test_greedy_generate_matches_model_generate(odd_one):
    model = tiny_model(seed=7)
    prompts, _ = random_pairs(seed=8, odd_one=odd_one)
    prompts = list(dict.fromkeys(map(tuple, prompts)))
    prompts = [list(p) for p in prompts]
    stop = {5, 9}
    got = E.greedy_generate(model, prompts, 6, stop_ids=stop, batch_size=3)
    for p, g in zip(prompts, got):
        ref = model.generate(torch.tensor([p]), 6, stop_ids=stop)[0].tolist()
        assert g == E._cut(ref, stop), f"prompt {p}: ours {g}, generate {ref}"


# ---- prompts and answers ---------------------------------------------------------------------------

def test_render_prompt_shots_and_corruption():
    ex = Example(instruction="Say the opposite.", input="hot", output="cold")
    shot = Example(instruction="Say the opposite.", input="up", output=" down ")
    text = TOK.decode(E.render_prompt(TOK, ex, shots=[shot]))
    turns = text.count("<|im_start|>")
    assert turns == 4 and text.endswith("<|im_start|>assistant\n"), text
    assert text.count("Say the opposite.") == 2 and "assistant\ndown<|im_end|>" in text, text
    corrupted = TOK.decode(E.render_prompt(TOK, ex, shots=[shot], with_instruction=False))
    assert "Say the opposite." not in corrupted and "user\nhot<|im_end|>" in corrupted, corrupted
    with_system = TOK.decode(E.render_prompt(TOK, ex, system="Be brief."))
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>"), with_system


def test_answer_and_knowledge_ids():
    assert E.answer_ids(TOK, " cold ") == TOK.encode("cold") + [2]
    assert E.knowledge_ids(TOK, "Japan: capital is", "Tokyo") == (TOK.encode("Japan: capital is"), TOK.encode(" Tokyo"))
    # a trailing space moves to the answer; after a newline no space is added
    assert E.knowledge_ids(TOK, "capital is ", "Tokyo") == (TOK.encode("capital is"), TOK.encode(" Tokyo"))
    assert E.knowledge_ids(TOK, "Q: capital?\n", "Tokyo") == (TOK.encode("Q: capital?\n"), TOK.encode("Tokyo"))


def test_normalize_answer():
    n = E.normalize_answer
    # presentation is forgiven: whitespace, quotes, markdown stars, final punctuation, first capital
    assert n("  Cold. ") == n("cold") == "cold"
    assert n('"Young, Victor."') == n("Young,  Victor") and n("**Paris**!") == "paris"
    # format is not: case beyond the first letter, inner punctuation, extra words
    assert n("tree morning") != n("TREE MORNING") and n("Tree Morning") != n("TREE MORNING")
    assert n("Young Victor") != n("Young, Victor") and n("m u s i c") != n("m-u-s-i-c")
    assert n("1987/03/18") != n("1987-03-18") and n("cold") != n("colder") and n("the cold") != n("cold")


def test_may_still_match_never_stops_a_match():
    # soundness of the early stop: every prefix of a reply that matches must be kept going...
    golds = ["cold", "TREE MORNING", "Young, Victor", "m-u-s-i-c", "U.S.", '"ca"', "Zürich"]
    decor = ["{}", "{}.", " {} ", '"{}"', "**{}**!", "{}.\"", "  {}\n", "`{}`?"]
    for gold in golds:
        replies = [d.format(g) for d in decor for g in (gold, gold[:1].upper() + gold[1:])]
        for reply in replies:
            assert E.normalize_answer(reply) == E.normalize_answer(gold), (reply, gold)
            for k in range(len(reply) + 1):
                assert E.may_still_match(reply[:k], gold), f"stopped {reply[:k]!r} of {reply!r} (gold {gold!r})"
    # ...and a reply that went wrong is stopped
    for partial, gold in [("The", "cold"), ("cold and", "cold"), ("tree", "TREE MORNING"), ("Young V", "Young, Victor"),
                          ("m u", "m-u-s-i-c"), ("cold.x", "cold"), ("colder", "cold")]:
        assert not E.may_still_match(partial, gold), (partial, gold)
    assert E.may_still_match("Z\ufffd", "Zürich")  # half a character: cannot judge yet


def test_real_tokenizer_prompt_convention():
    from ivft import load
    try:
        _, tok = load.load_model(None)
    except Exception as e:  # noqa: BLE001 - no embedded model here: nothing to check
        pytest.skip(f"embedded model unavailable: {e}")
    from ivft.tasks import user_prompt
    ex = Example(instruction="What is the opposite of the word?", input="hot", output="cold")
    ids = E.render_prompt(tok, ex)
    assert ids == tok.chat_prompt(user_prompt(ex))
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert E.answer_ids(tok, "cold") == tok.encode("cold") + [tok.special_tokens["<|im_end|>"]]
    corrupted = tok.decode(E.render_prompt(tok, ex, with_instruction=False))
    assert "opposite" not in corrupted and "user\nhot<|im_end|>" in corrupted


# ---- metrics on a model with hand-set log-probabilities ---------------------------------------------
# Every chat prompt ends with "\n" (of "assistant\n"), so the bigram model answers every example alike.
TABLE = {("\n", "c"): 6.0, ("\n", "a"): 5.0, ("\n", "b"): 2.0,
         ("c", "a"): 6.0,
         ("a", "E"): 6.0, ("a", "b"): 4.0,
         ("b", "E"): 6.0,
         ("s", " "): 3.0, (" ", "c"): 2.0}


def test_choice_accuracy_and_instruction_logprob_by_hand():
    model, L = bigram_model(TABLE)
    s = {"ab": lp(L, "\n", "a") + lp(L, "a", "b") + lp(L, "b", "E"),
         "b": lp(L, "\n", "b") + lp(L, "b", "E"),
         "ca": lp(L, "\n", "c") + lp(L, "c", "a") + lp(L, "a", "E")}
    assert s["ca"] > s["ab"] > s["b"] + 0.5  # the margins the expectations below rely on
    test = [Example("i", "x", "ca", choices=["ab", "b", "ca"]),    # gold ranks first: right
            Example("i", "y", "ab", choices=["ab", "b"]),          # gold ranks first: right
            Example("i", "z", "b", choices=["ab", "b"])]           # "ab" beats gold: wrong
    out = E.evaluate_task(model, TOK, make_task(test), metrics=("choice_accuracy", "instruction_logprob"),
                          progress=False)
    assert out["choice_accuracy"] == pytest.approx(2 / 3)
    assert out["instruction_logprob"] == pytest.approx((s["ca"] + s["ab"] + s["b"]) / 3, abs=1e-4)
    # without choices the task's label set {ab, b, ca} is ranked: only "ca" can win
    test = [Example("i", "x", "ca"), Example("i", "y", "ab"), Example("i", "z", "b"), Example("i", "w", "ca")]
    out = E.evaluate_task(model, TOK, make_task(test), metrics=("choice_accuracy",), progress=False)
    assert out["choice_accuracy"] == pytest.approx(0.5)


def test_exact_match_by_hand():
    model, _ = bigram_model(TABLE)  # greedy from "\n": c (6) -> a (6) -> <|im_end|>: "ca"
    test = [Example("i", "x", "Ca."), Example("i", "y", '"ca"'), Example("i", "z", "CA"), Example("i", "w", "cab"),
            Example("i", "v", "ca")]
    out = E.evaluate_task(model, TOK, make_task(test, metric="exact_match"), metrics=("exact_match",), progress=False)
    assert out["exact_match"] == pytest.approx(3 / 5)
    # gold "c" alone gives room for 2 tokens: the model's "ca" still shows it went on past "c"
    out = E.evaluate_task(model, TOK, make_task([Example("i", "z", "c")]), metrics=("exact_match",), progress=False)
    assert out["exact_match"] == 0.0


def test_reply_contains_rule():
    assert E.reply_contains("The capital of the United Kingdom is London.", "London")
    assert E.reply_contains("london", "London") and E.reply_contains("Cold.", "cold")
    assert E.reply_contains('The plural of "soldier" is "soldiers."', "soldiers")
    assert E.reply_contains("it is more  boring now", "more boring")     # whitespace collapsed
    assert not E.reply_contains("UNITED KINGDOM", "London")            # another task's format
    assert not E.reply_contains("LONDON", "London")                    # case kept after the first letter
    assert not E.reply_contains("Londoner", "London") and not E.reply_contains("moreboring", "more boring")
    # while decoding, a match at the very end is not settled until a following character shows
    assert not E.reply_contains("is London", "London", final=False)
    assert E.reply_contains("is London.", "London", final=False)


def test_reply_contains_equals_naive_generation():
    # reply_contains decodes with an early stop once the answer has appeared: the verdict must be the
    # one read off each example's full greedy reply from Transformer.generate
    model = tiny_model(seed=5)
    inputs = ["ab", "cde", "f", "ghij", "kl", "mno", "p", "qrs"]
    stop = TOK.stop_ids()
    replies, full = [], []
    for w in inputs:
        prompt = E.render_prompt(TOK, Example("Say it.", w, "x"))
        out = model.generate(torch.tensor([prompt]), E.REPLY_TOKENS, stop_ids=stop)[0].tolist()
        full.append(out)
        replies.append(TOK.decode([t for t in E._cut(out, stop) if t not in stop]))
    # golds: a word the reply really contains (as whole words or not), something absent, or the
    # whole reply (an exact match)
    golds = []
    for i, r in enumerate(replies):
        words = [x for x in r.replace("\ufffd", " ").split() if x.strip(".,:;?!'\"-")]
        part = r[1:4] if "\ufffd" not in r[1:4] and r[1:4].strip() else ""
        whole = r if r.strip() and all(c in TOK.chars for c in r) and len(r.strip()) < E.REPLY_TOKENS else ""
        golds.append(whole if i % 4 == 3 and whole else
                     words[0] if words and i % 2 == 0 else (part if i % 3 == 1 and part else "zzqq"))
    test = [Example("Say it.", w, g) for w, g in zip(inputs, golds)]
    want = sum(E.reply_contains(r, g) for r, g in zip(replies, golds)) / len(test)
    # exact match reads the same greedy reply, cut at its budget: the longest gold + end token
    budget = max(len(E.answer_ids(TOK, g)) for g in golds)
    em = [E.normalize_answer(TOK.decode([t for t in E._cut(out[:budget], stop) if t not in stop]))
          == E.normalize_answer(g) for out, g in zip(full, golds)]
    want_em = sum(em) / len(test)
    for bs in (1, 3):
        out = E.evaluate_task(model, TOK, make_task(test, metric="reply_contains"), metrics=("reply_contains",),
                              batch_size=bs, progress=False)
        assert out["reply_contains"] == pytest.approx(want), (replies, golds)
        # one decoding pass serves both generation metrics (and rides on choice ranking's pass):
        # each verdict must be the one it gets alone
        both = E.evaluate_task(model, TOK, make_task(test, metric="reply_contains"),
                               metrics=("reply_contains", "exact_match", "choice_accuracy"), batch_size=bs,
                               progress=False)
        assert both["reply_contains"] == pytest.approx(want), (replies, golds)
        assert both["exact_match"] == pytest.approx(want_em), (replies, golds)
    assert 0 < want < 1, (replies, golds)  # both verdicts exercised
    assert want_em > 0, (replies, golds)


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
    want = [[E._cut(model.generate(torch.tensor([p]), 12, stop_ids=stop)[0].tolist(), stop) for p in ps] for ps in groups]
    assert len({len(w) for ws in want for w in ws}) > 1   # rows end at different steps
    for bs in (2, 64):   # pools that step while groups arrive; one pool holding everything
        dec = E._Decoder(model, stop, bs)
        gens = [E._run_prompts(model, ps, [[] for _ in ps], max_new_tokens=12, stop_ids=stop, batch_size=bs,
                               progress=False, decoder=dec)[1] for ps in groups]
        dec.finish()
        assert [[E._cut(x, stop) for x in gs] for gs in gens] == want, bs


def test_pooled_decoding_across_tasks_equals_naive_generation():
    # evaluate_suite decodes rows of all tasks in shared pools (continuous batching): tasks whose
    # prompts differ in length, in pools smaller and larger than a task, must give every verdict
    # that each example's own full greedy reply gives
    model = tiny_model(seed=5)
    stop = TOK.stop_ids()
    specs = {"short": ("Say.", ["ab", "cde", "f", "gh", "kl"]),
             "long": ("Say it again and again please.", ["mno", "p", "qrs", "tu", "vw", "xyz", "a"])}
    tasks, want = [], {}
    for name, (instr, inputs) in specs.items():
        test = []
        for j, w in enumerate(inputs):
            out = model.generate(torch.tensor([E.render_prompt(TOK, Example(instr, w, "x"))]), E.REPLY_TOKENS,
                                 stop_ids=stop)[0].tolist()
            reply = TOK.decode([t for t in E._cut(out, stop) if t not in stop])
            words = [x for x in reply.replace("\ufffd", " ").split() if all(c in TOK.chars for c in x)]
            test.append(Example(instr, w, words[0] if words and j % 2 == 0 else "zzqq"))
        tasks.append(make_task(test, name=name, metric="reply_contains"))
        want[name] = [E.reply_contains(TOK.decode([t for t in E._cut(model.generate(
            torch.tensor([E.render_prompt(TOK, ex)]), E.REPLY_TOKENS, stop_ids=stop)[0].tolist(), stop) if t not in stop]),
            ex.output) for ex in test]
    assert 0 < sum(map(sum, want.values())) < sum(map(len, want.values()))   # both verdicts exercised
    for bs in (2, 64):
        rep = E.evaluate_suite(model, TOK, tasks, metrics=("reply_contains",), batch_size=bs, progress=False)
        for name, verdicts in want.items():
            assert rep["tasks"][name]["reply_contains"] == pytest.approx(sum(verdicts) / len(verdicts)), (name, bs)


def test_knowledge_logprob_by_hand():
    model, L = bigram_model(TABLE)
    test = [Example("i", "x", "ca", knowledge_prompt="it is", knowledge_answer="ca"),
            Example("i", "y", "ab")]  # no knowledge prompt: not counted
    out = E.evaluate_task(model, TOK, make_task(test), metrics=("knowledge_logprob",), progress=False)
    expected = lp(L, "s", " ") + lp(L, " ", "c") + lp(L, "c", "a")
    assert out["knowledge_logprob"] == pytest.approx(expected, abs=1e-4)
    out = E.evaluate_task(model, TOK, make_task(test[1:]), metrics=("knowledge_logprob",), progress=False)
    assert "knowledge_logprob" not in out


def test_kshot_metrics_use_fixed_demonstrations():
    model = tiny_model(seed=11)
    train = [Example("Copy.", w, w) for w in ("ab", "cd", "ef", "gh", "ij")]
    test = [Example("Copy.", w, w) for w in ("kl", "mn")]
    task = make_task(test, train)
    out = E.evaluate_task(model, TOK, task, k_shot=2, seed=3, progress=False)
    assert {"exact_match_kshot", "choice_accuracy_kshot", "instruction_logprob_kshot"} <= set(out)
    shots = E.draw_shots(task, 2, seed=3)
    assert shots == E.draw_shots(task, 2, seed=3) and len(shots) == 2
    prompts = [E.render_prompt(TOK, ex, shots) for ex in test]
    ref = sum(naive_score(model, p, E.answer_ids(TOK, ex.output)) for p, ex in zip(prompts, test)) / 2
    assert out["instruction_logprob_kshot"] == pytest.approx(ref, abs=1e-4)
    assert out["instruction_logprob_kshot"] != pytest.approx(out["instruction_logprob"], abs=1e-3)
    zero = E.evaluate_task(model, TOK, task, k_shot=0, progress=False)
    assert not any(k.endswith("_kshot") for k in zero)
    # a task that ships its own demonstrations (SuperNI) draws from those, not from train
    task.demos = [Example("Copy.", "zz", "zz"), Example("Copy.", "yy", "yy")]
    assert sorted(ex.input for ex in E.draw_shots(task, 2, seed=3)) == ["yy", "zz"]
    # a real SuperNI task ships 2: k = 3 takes both and one train example
    three = E.draw_shots(task, 3, seed=3)
    assert len(three) == 3 and {"yy", "zz"} <= {ex.input for ex in three}


def test_fewer_demonstrations_than_k_uses_them_all_and_says_so(capsys):
    model = tiny_model()
    task = make_task([Example("i", "x", "ab")])
    out = E.evaluate_task(model, TOK, task, k_shot=3, progress=False)
    assert "instruction_logprob_kshot" in out
    assert "k_shot=3 uses those" in capsys.readouterr().err


def test_no_autograd_graph_is_built():
    # evaluation must not record autograd graphs (memory and time), whatever the caller's grad mode
    model = tiny_model()
    grad_modes, forward = [], model.forward
    model.forward = lambda *a, **k: (grad_modes.append(torch.is_grad_enabled()), forward(*a, **k))[1]
    task = make_task([Example("Copy.", "ab", "ab", choices=["ab", "ba"])], [Example("Copy.", "cd", "cd")])
    E.evaluate_task(model, TOK, task, k_shot=1, progress=False)
    E.score_continuations(model, [[5, 6]], [[7, 8]])
    assert grad_modes and not any(grad_modes), grad_modes


def test_choice_candidates_fallback():
    outputs = [f"w{i}" for i in range(30)]
    task = make_task([Example("i", o, o) for o in outputs])
    c1 = E.choice_candidates(task, task.test[4], index=4, seed=0)
    assert len(c1) == 1 + E.N_DISTRACTORS and "w4" in c1 and len(set(c1)) == len(c1)
    assert c1 == E.choice_candidates(task, task.test[4], index=4, seed=0)
    assert c1 != E.choice_candidates(task, task.test[4], index=4, seed=1)
    small = make_task([Example("i", "a", "yes"), Example("i", "b", "no")], [Example("i", "c", "maybe")])
    assert E.choice_candidates(small, small.test[0]) == ["maybe", "no", "yes"]


# ---- continual-learning summary --------------------------------------------------------------------

def report(scores, general=None, general_k=None):
    tasks = {t: {"choice_accuracy": v} for t, v in scores.items()}
    for t, v in (general or {}).items():
        tasks[t] = {"exact_match": v, "exact_match_kshot": general_k[t]}
    primary = {t: "choice_accuracy" for t in scores} | {t: "exact_match" for t in (general or {})}
    return {"model": "m", "tasks": tasks, "primary": primary, "settings": {}}


def test_cl_metrics_by_hand():
    R = [[0.1, 0.2, 0.3],
         [0.8, 0.3, 0.3],
         [0.6, 0.9, 0.4],
         [0.5, 0.7, 0.9]]
    G = [(0.6, 0.4), (0.5, 0.3), (0.4, 0.3), (0.3, 0.2)]        # (g1, g2) zero-shot per stage
    GK = [(0.7, 0.5), (0.7, 0.4), (0.6, 0.4), (0.6, 0.3)]       # k-shot
    reports = [report(dict(zip("ABC", r)), {"g1": g[0], "g2": g[1]}, {"g1": k[0], "g2": k[1]})
               for r, g, k in zip(R, G, GK)]
    cl = E.cl_metrics(reports, ["A", "B", "C"], ["g1", "g2"])
    assert cl["R"] == R
    assert cl["AP"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert cl["BWT"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert cl["FWT"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.3)) / 2)
    assert cl["forgetting"]["A"] == pytest.approx(0.8 - 0.5)
    assert cl["forgetting"]["B"] == pytest.approx(0.9 - 0.7)
    assert cl["forgetting"]["C"] is None
    assert cl["GP"] == pytest.approx([0.5, 0.4, 0.35, 0.25])
    assert cl["GP_drop"] == pytest.approx(0.25) and cl["IP_drop"] == pytest.approx(0.6 - 0.45)
    # every metric the general reports share, per stage (here the primary ones themselves)
    assert cl["general"]["exact_match"] == pytest.approx(cl["GP"])
    assert cl["general"]["exact_match_kshot"] == pytest.approx(cl["IP"])
    # one stage: nothing learned before it, so BWT, FWT and forgetting are undefined
    one = E.cl_metrics(reports[:2], ["A", "B", "C"], ["g1"])
    assert one["AP"] == pytest.approx(0.8) and one["BWT"] is None and one["FWT"] is None
    assert one["forgetting"] == {"A": None}
    assert one["GP_drop"] == pytest.approx(0.1) and one["IP_drop"] == pytest.approx(0.0)
    # no k-shot scores in the reports: IP is None, GP still computed
    bare = [report({"A": 0.1}, {"g1": 0.5}, {"g1": 0.5}), report({"A": 0.2}, {"g1": 0.4}, {"g1": 0.4})]
    for r in bare:
        del r["tasks"]["g1"]["exact_match_kshot"]
    cl = E.cl_metrics(bare, ["A"], ["g1"])
    assert cl["IP"] is None and cl["GP_drop"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least one stage"):
        E.cl_metrics(reports[:1], ["A"], [])
    with pytest.raises(ValueError, match="stages"):
        E.cl_metrics(reports, ["A"], [])


def test_report_roundtrip_and_table(tmp_path, capsys):
    model = tiny_model()
    task = make_task([Example("Copy.", "ab", "ab"), Example("Copy.", "cd", "cd")], name="copy")
    rep = E.evaluate_suite(model, TOK, [task], model_name="tiny", n=2, progress=False)
    assert set(rep) >= {"model", "tasks", "settings"} and rep["primary"] == {"copy": "choice_accuracy"}
    assert E.primary_score(rep, "copy") == rep["tasks"]["copy"]["choice_accuracy"]
    path = tmp_path / "sub" / "report.json"
    E.save_report(rep, path)
    assert json.loads(path.read_text()) == rep
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left behind
    E.print_table(rep)
    out = capsys.readouterr().out
    assert "copy" in out and "choice_accuracy" in out and "*" in out


def test_plot_cl_png_or_skip(tmp_path, monkeypatch):
    cl = E.cl_metrics([report({"A": 0.1, "B": 0.2}, {"g": 0.5}, {"g": 0.6}),
                       report({"A": 0.9, "B": 0.3}, {"g": 0.4}, {"g": 0.6})], ["A", "B"], ["g"])
    path = E.plot_cl(cl, tmp_path / "cl.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert path is None and not (tmp_path / "cl.png").exists()
    else:
        assert (tmp_path / "cl.png").read_bytes()[:4] == b"\x89PNG"
    # without matplotlib: nothing drawn, no error
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert E.plot_cl(cl, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


# ---- bad input ------------------------------------------------------------------------------------

def test_empty_task_is_an_error():
    with pytest.raises(ValueError, match="'void' has no test examples"):
        E.evaluate_task(tiny_model(), TOK, make_task([], name="void"), progress=False)


def test_empty_answer_is_an_error():
    task = make_task([Example("i", "ok", "ab"), Example("i", "bad", "   ")], name="holes")
    with pytest.raises(ValueError, match=r"'holes', test example 1 \(input 'bad'\).*tokenizes to nothing"):
        E.evaluate_task(tiny_model(), TOK, task, progress=False)
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        E.answer_ids(TOK, "")


def test_other_bad_inputs():
    model = tiny_model()
    task = make_task([Example("i", "x", "ab", choices=["cd", "ef"])], name="t")
    with pytest.raises(ValueError, match="gold 'ab' is not among its choices"):
        E.evaluate_task(model, TOK, task, metrics=("choice_accuracy",), progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        E.evaluate_task(model, TOK, task, metrics=("accuracy",), progress=False)
    with pytest.raises(ValueError, match="empty continuation"):
        E.score_continuations(model, [[5, 6]], [[]])
    with pytest.raises(ValueError, match="empty prompt"):
        E.score_continuations(model, [[]], [[5]])


def test_cli_errors_exit_2(capsys):
    # an unknown task fails before any model is loaded, with one line that names the known tasks
    assert E.main(["--tasks", "no_such_task_xyz", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error:") and "no_such_task_xyz" in err[0], err
    from ivft import tasks
    assert any(name in err[0] for name in tasks.list_tasks())
    with pytest.raises(SystemExit) as e:
        E.main(["--n", "-1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        E.main(["--metrics", "accuracy"])
    assert e.value.code == 2


def test_unwritable_out_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from ivft import load
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert E.main(["--tasks", "antonym", "--out", str(blocker / "report.json"), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker / "report.json") in err[0] and "cannot write" in err[0]
