"""Tests for ivft/ivcheck.py: the restored share and its noise guard, the rank correlation. check_iv
itself runs on a planted head in tests/test_extract_iv.py."""
import pytest
import torch

from ivft.ivcheck import gap_or_none, spearman


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
