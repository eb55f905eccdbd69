"""Tests of ivft/data.py (collation: the loss sees answer tokens only) and of train.py's lr schedule."""
import pytest

from ivft.data import Item, collate
from train import lr_at
from toys import byte_tokenizer


def test_lr_schedule():
    lrs = [lr_at(s, 10, 1.0, "cosine", warmup=2, min_lr_ratio=0.1) for s in range(10)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[2:], lrs[3:]))           # monotone after warmup


def test_collate_targets_answer_tokens_only():
    tok = byte_tokenizer()
    items = [Item([1, 2, 3, 10, 11, 258], 3, 0), Item([1, 2, 20, 258], 2, 1)]
    b = collate(items, tok.pad_id, "cpu")
    assert b["idx"].tolist() == [[1, 2, 3, 10, 11], [1, 2, 20, 258, 258]]       # inputs = ids[:-1], right-padded
    assert b["targets"].tolist() == [[-100, -100, 10, 11, 258], [-100, 20, 258, -100, -100]]
    assert b["last"].tolist() == [2, 1]                        # the last prompt token predicts the answer
    assert b["pad_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert b["n_tokens"] == 8 and b["task"].tolist() == [0, 1]
