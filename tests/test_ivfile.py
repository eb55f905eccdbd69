"""Tests for ivft/ivfile.py: an IV file round-trips (atomically, readable by others, with its
heatmap) and is refused by a model it does not fit. Caching on weights and settings (get_iv):
tests/test_extract_iv.py."""
import importlib.util
import os

import pytest
import torch

import extract_iv as X
from toys import SMALL, TOK, char_model, llama_tiny, standin_task
from ivft.ivfile import load_iv, save_iv
from ivft.ivsettings import ExtractError
from model import Intervention


def test_save_and_load_round_trip(tmp_path):
    model = char_model()
    a = X.extract_iv(model, TOK, standin_task(), progress=False, seed=3, model_id="tiny", **SMALL)
    m = a["meta"]
    path = save_iv(a, tmp_path / "sub" / "opp.safetensors")
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []   # no temp left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask                             # readable by others
    # the heatmap is optional: written beside the file with matplotlib, skipped without
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert path.with_suffix(".png").is_file() == has_mpl
    iv, layer, meta = load_iv(path, model)
    assert torch.equal(iv, a["iv"]) and layer == a["layer"] and meta == m
    # the IV is what the model adds
    out = model(torch.tensor([[1, 5, 7]]), intervention=Intervention(pos=torch.tensor([2]), add_resid={layer: iv}))
    assert torch.isfinite(out).all()


def test_load_iv_rejects_another_model(tmp_path):
    a = X.extract_iv(char_model(), TOK, standin_task(), progress=False, **SMALL)
    path = save_iv(a, tmp_path / "opp.safetensors")
    other = llama_tiny(vocab=100)
    with pytest.raises(ExtractError, match="opp.safetensors"):
        load_iv(path, other)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ExtractError, match="bad.safetensors"):
        load_iv(bad, other)
    with pytest.raises(ExtractError, match="missing.safetensors"):
        load_iv(tmp_path / "missing.safetensors", other)
