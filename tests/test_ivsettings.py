"""Tests for ivft/ivsettings.py: the model-dependent defaults and the checks on settings."""
import pytest

from ivft.errors import ExtractError
from ivft.ivsettings import Settings, default_layer, default_top_k


def test_defaults_scale_with_the_model():
    # the embedded model's defaults are the dev sweep's choice: K = 40 after block 17
    assert default_top_k(30 * 9) == 40 and default_layer(30) == 17
    assert default_top_k(32 * 32) == 152 and default_top_k(16) == 3
    assert default_layer(32) == 18 and default_layer(4) == 2 and default_layer(1) == 0


def test_bad_settings_fail_clearly():
    # bad settings against a model (layer out of range) and too few examples: test_extract_iv.py
    with pytest.raises(ExtractError, match="at least"):
        Settings(n_clean=1)
    with pytest.raises(ExtractError, match="shots >= 2"):
        Settings(corrupt="shuffled", shots=1)
    with pytest.raises(ExtractError, match="'auto'"):
        Settings(layer="last")
