"""Tests for ivft/ivfile.py: an IV file round-trips (atomically, readable by others, with its
heatmap, itself written atomically), is refused by a model it does not fit, and a damaged cache file
is said and not reused. Caching on weights and settings (get_iv): tests/test_extract_iv.py. The
output paths checked before the work: tests/test_extract_iv_writes.py."""
import importlib.util
import os

import pytest
import torch

import extract_iv as X
from toys import SMALL, TOK, char_model, llama_tiny, standin_task
from ivft.ivfile import cached_iv, load_iv, save_iv
from ivft.ivsettings import Settings
from ivft.errors import ExtractError
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


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the heatmap needs matplotlib")
def test_the_heatmap_is_a_png_written_atomically(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    a = X.extract_iv(char_model(), TOK, standin_task(), progress=False, **SMALL)
    path = save_iv(a, tmp_path / "opp.safetensors")
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.with_suffix(".png").unlink()
    real = Figure.savefig

    def full_disk(self, fname, **kw):          # half a PNG, then a full disk
        real(self, fname, **kw)
        with open(fname, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(ExtractError, match=r"opp\.png: cannot write \(No space left"):   # names the file
        save_iv(a, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opp.safetensors"]   # no half PNG, no temporary


def test_a_damaged_cache_file_is_said_and_not_reused(tmp_path, capsys):
    model, task = char_model(), standin_task()
    key = Settings(**SMALL).resolve(model).key()
    path = tmp_path / "opp.safetensors"
    assert cached_iv(path, task, key, model) is None                 # no file: nothing to say
    save_iv(X.extract_iv(model, TOK, task, progress=False, **SMALL), path)
    assert cached_iv(path, task, key, model)["reused"]
    assert cached_iv(path, task, {**key, "seed": 1}, model) is None  # other settings
    capsys.readouterr()
    path.write_bytes(b"damaged")
    assert cached_iv(path, task, key, model) is None
    assert f"note: {path}: not a readable IV file" in capsys.readouterr().err


def test_bad_iv_content_and_metadata_are_one_line_naming_the_file(tmp_path):
    from ivft.ivfile import read_iv
    model = char_model()
    a = X.extract_iv(model, TOK, standin_task(), progress=False, **SMALL)
    mc = model.config
    nan_iv, inf_aie = a["iv"].clone(), a["aie"].clone()
    nan_iv[0], inf_aie[0, 0] = float("nan"), float("inf")
    bad = {"nan_iv": ({"iv": nan_iv}, {}, "tensor iv holds NaN"),
           "inf_aie": ({"aie": inf_aie}, {}, "tensor aie holds NaN or Inf"),
           "negative_norm": ({}, {"state_norms": [1.0, -2.0, 3.0]}, "'state_norms'"),
           "zero_norm": ({}, {"state_norms": [0.0] * mc.num_hidden_layers}, "'state_norms'"),
           "nan_norm": ({}, {"state_norms": [float("nan")]}, "'state_norms'"),
           "string_norms": ({}, {"state_norms": "big"}, "'state_norms'"),
           "string_layer": ({}, {"layer": "1"}, "metadata 'layer' is '1'"),
           "bool_layer": ({}, {"layer": True}, "metadata 'layer'"),
           "heads_not_pairs": ({}, {"heads": [[0, 1, 2]]}, "metadata 'heads'"),
           "heads_string": ({}, {"heads": "all"}, "metadata 'heads'"),
           "task_number": ({}, {"task": 7}, "metadata 'task' is 7"),
           "top_k_float": ({}, {"top_k": 2.5}, "metadata 'top_k'")}
    for name, (tensors, meta, what) in bad.items():
        path = save_iv({**a, **tensors, "meta": {**a["meta"], **meta}}, tmp_path / f"{name}.safetensors")
        with pytest.raises(ExtractError) as e:
            load_iv(path, model)
        assert str(e.value).startswith(f"{path}: ") and what in str(e.value), (name, str(e.value))
    # heads out of this model's range: refused by load_iv, naming the head
    path = save_iv({**a, "meta": {**a["meta"], "heads": [[0, mc.num_attention_heads]]}}, tmp_path / "far.safetensors")
    read_iv(path)                     # in range for some model: the file itself is fine
    with pytest.raises(ExtractError, match=f"far.safetensors: metadata 'heads' names head \\[0, {mc.num_attention_heads}\\]"):
        load_iv(path, model)
