"""Tests for ivft/ivcheck.py: the restored share and its noise guard, the rank correlation, the advice
and how train.py says it. check_iv, the sweep behind the advice and --layer auto's choice of kind run
on a planted head in tests/test_extract_iv.py."""
import pytest
import torch

from ivft.ivcheck import (CLEAN_ACCURACY_MIN, RESTORED_ACCURACY_MIN, SWEEP_MARGIN, gap_or_none, iv_advice,
                          iv_verdict, spearman, training_lines)
from ivft.tasks import Task


def test_restored_share_and_its_noise_guard():
    clean, cor = torch.tensor([-1.0, -1.5, -0.5, -1.2]), torch.tensor([-5.0, -6.0, -4.5, -5.5])
    r, note = gap_or_none(clean, cor, torch.tensor([-3.0, -4.0, -2.5, -3.0]))
    assert r == pytest.approx((-3.125 + 5.25) / (-1.05 + 5.25)) and "±" in note
    # a gap smaller than twice its standard error is not a ratio worth printing
    r, note = gap_or_none(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0]),
                          torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert r is None and "within noise" in note
    r, _ = gap_or_none(torch.zeros(5), torch.zeros(5), torch.ones(5))
    assert r is None


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660254)


# ---- what the IV can carry: the advice from the check's numbers ----------------------------------
# (through the real check on tiny models: tests/test_extract_iv.py)

def row(kind, layer, restored, gain=0.0, k=None):
    return {"kind": kind, "k": k, "layer": layer, "restored_logprob": restored, "accuracy_gain": gain}


def test_no_vector_carries_what_the_model_cannot_do_in_context():
    lines = iv_advice(CLEAN_ACCURACY_MIN - 0.01, 0.0, 0.0, 0.0)
    assert len(lines) == 1 and "no vector can carry what the model cannot do" in lines[0]
    assert f"{CLEAN_ACCURACY_MIN - 0.01:.2f} < {CLEAN_ACCURACY_MIN}" in lines[0]
    # whatever the IV does: the verdict is about the clean prompts
    assert iv_verdict(0.1, 0.9) == "cannot" and iv_verdict(0.1, None) == "cannot"


def test_an_iv_that_carries_the_task_gets_no_advice():
    assert iv_advice(0.9, 0.0, 0.8, 0.89) == []
    assert iv_advice(CLEAN_ACCURACY_MIN, 0.0, 0.2, RESTORED_ACCURACY_MIN) == []   # thresholds are "below"
    # a gap within noise (restored None): the query alone already does it, there is nothing to restore
    assert iv_advice(1.0, 0.98, 1.0, None) == []


def test_an_iv_that_restores_little_and_what_limits_it():
    lines = iv_advice(0.58, 0.0, 0.12, 0.21)
    assert len(lines) == 1 and "restores little although the clean prompts work" in lines[0]
    assert "clean 0.58, query alone 0.00, query alone + IV 0.12: 0.21 of the gap" in lines[0]
    own, resid = row("heads", 17, 0.58, 0.0, k=40), row("resid", 21, 0.77, 0.4)
    lines = iv_advice(0.58, 0.0, 0.12, 0.21, current=own, best=resid)
    assert len(lines) == 2 and lines[1].endswith("rerun with --kind resid --layer 21")
    assert "(--kind heads --layer 17 --top_k 40) 0.58" in lines[1]
    chosen = iv_advice(0.58, 0.0, 0.12, 0.21, current=own, best=resid, chosen=True)
    assert chosen[1].endswith("chosen (--layer auto)")
    # a best setting within SWEEP_MARGIN of the IV's own is noise on a small dev split: the model's limit
    close = row("heads", 19, 0.58 + SWEEP_MARGIN - 0.01, k=20)
    lines = iv_advice(0.58, 0.0, 0.12, 0.21, current=own, best=close)
    assert "what limits it is the model, not the setting" in lines[1] and "rerun" not in lines[1]


def test_train_py_says_the_advice_naming_the_task_and_the_check_that_sweeps():
    from ivft.tasks import load_task
    antonym = load_task("antonym")
    assert training_lines(antonym, []) == []
    cannot = iv_advice(0.1, 0.0, 0.0, 0.0)
    assert training_lines(antonym, cannot) == [f"IV of antonym: {cannot[0]}"]      # no sweep would help
    little = iv_advice(0.58, 0.0, 0.12, 0.21)
    said = training_lines(antonym, little)
    assert len(said) == 2 and said[0] == f"IV of antonym: {little[0]}"
    assert said[1].startswith("IV of antonym: `python extract_iv.py --task antonym --check` sweeps")
    # a task read from a file (not the registry's, whatever its name) is named by its file
    mine = Task(name="antonym", kind="train", metric="exact_match", train=[], test=[])
    assert "--task <its task file> --check" in training_lines(mine, little)[1]
    # the sweep has already said what limits the IV (--layer auto): no pointer to it
    swept = iv_advice(0.58, 0.0, 0.12, 0.21, current=row("heads", 17, 0.58, k=40), best=row("resid", 21, 0.77))
    assert training_lines(antonym, swept) == [f"IV of antonym: {line}" for line in swept]
