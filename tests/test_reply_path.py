"""One greedy-reply path: evaluate.py's scores, the IV check's and the study's come from the same
replies (engine.greedy_replies, run_prompts), so one model and one set of examples get one score,
with and without an IV. The model is the closed-form bigram toy, so the replies are known."""
import torch

import evaluate as E
from ivft.engine import greedy_replies
from ivft.ivcheck import check_iv
from ivft.ivprompts import chat_prompt
from ivft.tasks import Example, Task
from model import Intervention
from toys import PAIRS, TOK, bigram_model, tid

# After the generation prompt ("assistant\n") the bigram toy replies "cold. xxxx..." and never ends;
# evaluate's exact match reads the first (longest gold + 1) tokens, "cold.", reply_contains "cold".
# The IV adds e_9 to the residual stream, and "9" leads to "wet" + <|im_end|>.
TABLE = {("\n", "c"): 10, ("c", "o"): 10, ("o", "l"): 10, ("l", "d"): 10, ("d", "."): 10, (".", " "): 10,
         (" ", "x"): 10, ("x", "x"): 10, ("9", "w"): 10, ("w", "e"): 10, ("e", "t"): 10, ("t", "E"): 10}
OUTPUTS = ["cold", "wet", "dry", "cold", "warm", "wet"]


def toy():
    model, _ = bigram_model(TABLE)
    test = [Example("Say the opposite.", f"w{i}", out) for i, out in enumerate(OUTPUTS)]
    train = [Example("Say the opposite.", a, b) for a, b in PAIRS]
    iv = torch.zeros(model.config.hidden_size)
    iv[tid("9")] = 3.0
    return model, Task("toy", "train", "exact_match", train, test), iv


def test_evaluate_and_the_check_score_the_same_replies():
    model, task, iv = toy()
    metrics = ("exact_match", "reply_contains")
    plain = E.evaluate_task(model, TOK, task, metrics=metrics, progress=False)
    with_iv = E.evaluate_task(model, TOK, task, metrics=metrics, progress=False,
                              intervention=Intervention(add_resid={0: iv}))
    res = check_iv(model, TOK, task, iv, 0, n=len(OUTPUTS), settings={"shots": 2}, progress=False)
    assert [res["chat"][k] for k in ("exact", "contains")] == [plain[m] for m in metrics] == [2 / 6, 2 / 6]
    assert [res["chat_iv"][k] for k in ("exact", "contains")] == [with_iv[m] for m in metrics] == [2 / 6, 2 / 6]
    # the replies themselves, as the study's analyses read them (its scores() calls this)
    ps = [chat_prompt(TOK, ex) for ex in task.test]
    reps = greedy_replies(model, TOK, [p.ids for p in ps], [p.answer for p in ps], [p.text for p in ps],
                          intervention=Intervention(add_resid={0: iv}))
    assert reps["text"] == ["wet"] * 6 and reps["exact_match"] == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert greedy_replies(model, TOK, [p.ids for p in ps], [p.answer for p in ps], [p.text for p in ps],
                          intervention=Intervention(add_resid={0: iv}, scale=0.0)) \
        == greedy_replies(model, TOK, [p.ids for p in ps], [p.answer for p in ps], [p.text for p in ps])
