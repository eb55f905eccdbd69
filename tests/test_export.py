"""A checkpoint with LoRA adapters, as train.py writes it (ivft/checkpoint.py save_checkpoint), read
by other tools: transformers (with peft installed, which applies an adapter it finds beside the
weights) and peft on the adapters' base. Both must give the project's logits."""
import pytest
import torch

from ivft import checkpoint as ckpt
from ivft import lora
from ivft.load import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_families import FAMILIES, V  # noqa: E402
from test_model import assert_close, randomize, tiny_hf  # noqa: E402

BASES = {"llama": lambda: tiny_hf("llama"), "gpt2": lambda: tiny_hf("gpt2"),
         "qwen3": FAMILIES["qwen3"], "gemma3": FAMILIES["gemma3"]}


def lora_checkpoint(family, tmp_path, targets):
    torch.manual_seed(0)
    hf = BASES[family]().eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "base")
    model, _ = load_model(tmp_path / "base")
    spec = lora.LoraSpec(r=4, alpha=8, dropout=0.0, targets=targets, merge=False)
    lora.add_lora(model, spec.r, spec.alpha, spec.dropout, spec.targets)
    with torch.no_grad():   # a trained adapter: B is no longer 0
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(std=0.5)
    run = ckpt.RunFiles(out_dir=tmp_path / "run", settings={"note": "test"}, model_id=str(tmp_path / "base"),
                        lora=spec)
    state = {"stage_done": 1, "step": 0, "rng": [], "stages": [], "version": 1}
    ckpt.save_checkpoint(tmp_path / "run" / "stage-1", model, None, run, state)
    return model.eval(), tmp_path / "run" / "stage-1", spec


@pytest.mark.parametrize("family", list(BASES))
def test_unmerged_stage_opens_in_transformers_and_peft_with_our_logits(family, tmp_path):
    model, stage, spec = lora_checkpoint(family, tmp_path, ("q_proj", "v_proj"))
    assert not list(stage.glob("adapter_*")), "an adapter beside merged weights is applied twice by transformers"
    assert (stage / "adapter" / "adapter_config.json").is_file()
    idx = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        with lora.adapters_off(model):
            base_logits = model(idx)
        assert (ours - base_logits).abs().max() > 1e-2, "the adapter must change the logits for this test to see it"
        merged = transformers.AutoModelForCausalLM.from_pretrained(stage).eval()
        assert_close(merged(idx).logits, ours, 1e-4, f"{family}: transformers on the stage folder")
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        on_base = peft.PeftModel.from_pretrained(base, stage / "adapter").eval()
        assert_close(on_base(idx).logits, ours, 1e-4, f"{family}: peft, base + stage/adapter")


def test_resume_reads_the_adapters_back(tmp_path):
    model, stage, spec = lora_checkpoint("gpt2", tmp_path, ("q_proj", "v_proj", "o_proj"))
    fresh, _ = load_model(tmp_path / "base")
    ckpt.restore_model(fresh, stage, {"stage_done": 1, "step": 0}, spec, tmp_path / "run")
    idx = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))


def test_a_target_the_family_lacks_is_one_clear_error(tmp_path):
    hf = tiny_hf("gpt2")
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    with pytest.raises(ValueError, match=r"^--lora_targets gate_proj: a gpt2 model has no such linear layer "
                                         r"\(its linear layers: q_proj,k_proj,v_proj,o_proj,up_proj,down_proj\)$"):
        lora.add_lora(model, 4, 8, 0.0, ("q_proj", "gate_proj"))
