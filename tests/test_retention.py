"""Tests for ivft/retention.py by hand-computed examples: retentions and the robust endpoints, chance
correction, and bootstrap SEs against their closed forms (the ideal bootstrap variance of a mean is
the plug-in variance over n)."""
import math

import numpy as np
import pytest

from ivft import retention as R

BASE = {"a": [1, 1, 1, 1], "b": [1, 1, 0, 0], "c": [1, 0, 1, 1]}
TUNED = {"a": [1, 1, 0, 0], "b": [1, 0, 0, 0], "c": [1, 1, 1, 1]}


def test_endpoints_by_hand():
    rep = R.retention_report(BASE, TUNED, n_boot=50)
    # a: 0.5 / 1 = 0.5; b: 0.25 / 0.5 = 0.5; c: 1 / 0.75 = 4/3
    got = {k: v["retention"]["value"] for k, v in rep["per_task"].items()}
    assert got == pytest.approx({"a": 0.5, "b": 0.5, "c": 4 / 3})
    e = {k: v["value"] for k, v in rep["endpoints"].items()}
    assert e["median_retention"] == pytest.approx(0.5)
    assert e["mean_retention"] == pytest.approx((0.5 + 0.5 + 4 / 3) / 3)
    assert e["tasks_kept"] == 3.0
    # one task cannot carry the robust endpoints: c keeps everything, the median stays at 0.5
    assert R.retention_report(BASE, TUNED, keep=0.6, n_boot=50)["endpoints"]["tasks_kept"]["value"] == 1.0
    assert rep["per_task"]["b"]["base"]["value"] == 0.5 and rep["per_task"]["b"]["tuned"]["value"] == 0.25


def test_chance_correction_and_undefined_retention():
    assert float(R.retention(0.75, 0.5, chance=0.25)) == pytest.approx(0.5)
    assert float(R.retention(0.75, 0.25, chance=0.25)) == 0.0
    assert math.isnan(float(R.retention(0.25, 0.5, chance=0.25)))       # base at chance: nothing to keep
    # a task whose base is at chance is left out of the endpoints, not counted as kept or lost
    rep = R.retention_report({**BASE, "d": [0, 0]}, {**TUNED, "d": [1, 1]}, n_boot=50)
    assert rep["per_task"]["d"]["retention"]["value"] is None
    assert rep["endpoints"]["median_retention"]["value"] == pytest.approx(0.5)
    assert rep["endpoints"]["tasks_kept"]["value"] == 3.0


def test_bootstrap_se_of_a_mean_matches_its_closed_form():
    x = np.array([1.0] * 30 + [0.0] * 70)
    se = R.mean_se(x, n_boot=20000, seed=3)
    want = math.sqrt(0.3 * 0.7 / 100)          # plug-in variance / n
    assert se["value"] == pytest.approx(0.3) and se["se"] == pytest.approx(want, rel=0.03)
    # deterministic by seed, and another seed draws other replicates
    assert R.mean_se(x, n_boot=200, seed=3) == R.mean_se(x, n_boot=200, seed=3)
    assert R.mean_se(x, n_boot=200, seed=4)["se"] != R.mean_se(x, n_boot=200, seed=3)["se"]


def test_ratio_se_by_hand():
    # equal denominators: the ratio is the mean of num over a constant, and so is its SE
    num, den = np.array([0.0, 1.0, 2.0, 3.0] * 10), np.full(40, 4.0)
    r, m = R.ratio_se(num, den, n_boot=5000), R.mean_se(num, n_boot=5000, name="ratio")
    assert r["value"] == pytest.approx(1.5 / 4) and r["se"] == pytest.approx(m["se"] / 4)
    # the pooled ratio, not the mean of ratios: (1 + 9) / (1 + 3)
    assert R.ratio_se([1, 9], [1, 3], n_boot=10)["value"] == 2.5
    with pytest.raises(ValueError, match="drift"):
        R.ratio_se([1.0], [0.0], name="drift")


def test_retention_se_is_paired_and_zero_without_item_noise():
    # items that are all equal cannot move under resampling: every SE is 0
    flat = R.retention_report({"a": [1, 1, 1], "b": [1, 1]}, {"a": [0.5] * 3, "b": [1, 1]}, n_boot=100)
    assert all(v["se"] == 0.0 for v in flat["endpoints"].values())
    # paired: a tuned model identical to the base has retention exactly 1 in every replicate
    same = R.retention_report(BASE, BASE, n_boot=200)
    assert all(t["retention"] == {"value": 1.0, "se": 0.0} for t in same["per_task"].values())
    # an unpaired noise source would show here: the base's SE is that of its mean alone
    x = [1] * 6 + [0] * 4
    se = R.retention_report({"t": x}, {"t": x[::-1]}, n_boot=20000)["per_task"]["t"]["base"]["se"]
    assert se == pytest.approx(math.sqrt(0.6 * 0.4 / 10), rel=0.03)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="tasks differ"):
        R.retention_report({"a": [1]}, {"b": [1]})
    with pytest.raises(ValueError, match="task 'a': .*same non-empty"):
        R.retention_report({"a": [1, 0]}, {"a": [1]})
    with pytest.raises(ValueError, match="n_boot"):
        R.retention_report({"a": [1]}, {"a": [1]}, n_boot=1)
