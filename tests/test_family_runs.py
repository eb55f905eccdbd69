"""A short `train.py --guided` run and an `extract_iv.py` extraction on a tiny random model directory of
each family users bring (issue 37): Llama-2-style (SentencePiece + [INST] template), Mistral v3 (sliding
window), Qwen2 and Qwen3 (NFC byte-level BPE + ChatML), Gemma-3 (text) and Llama-3 (llama3 RoPE scaling +
tiktoken-style tokenizer). Each directory is what a user has: transformers' save_pretrained of a tiny
random config whose vocabulary is the real tokenizer's, beside that tokenizer's files and chat template
(tests/families.py). The run must finish with every stage evaluated, and its last stage folder must open in
transformers with the logits of the project's own model. Real vocabularies are 32k-128k tokens, so the
models are tiny everywhere else (hidden 32, 2 layers)."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

import families as F
import extract_iv
import train
from ivft.ivfile import load_iv
from ivft.load import load_model
from test_tokenizer import GGUF_PATH

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
from test_model import randomize  # noqa: E402  (after the importorskip)

WHEELS_MISSING = (f"the makers' tokenizer files are not here (run `bash setup.sh --test`; cache {F.CACHE}) "
                  f"or sentencepiece/protobuf, which transformers needs to convert them, are not installed")

# Gemma style: <start_of_turn>user / model turns, the system prompt put in front of the first user turn.
# Our own template: no real Gemma tokenizer file ships in a package we can read, so the Gemma-3 directory
# uses the Llama-2-style SentencePiece model with Gemma's two turn tokens added (what matters here is a
# SentencePiece tokenizer whose template writes added control tokens, as Gemma's does).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def can_convert_sentencepiece() -> bool:
    try:
        return all(importlib.util.find_spec(m) for m in ("sentencepiece", "google.protobuf"))
    except ModuleNotFoundError:      # no "google" package at all
        return False


# ---- the tokenizer folders: {family: a function (folder) -> the tokenizer written into folder} --------

def real_file(fam: str, folder: Path) -> str:
    path = F.real_file(fam, folder)
    if path is None or (fam != "llama3" and not can_convert_sentencepiece()):
        pytest.skip(WHEELS_MISSING)
    return path


def sentencepiece_tokenizer(fam: str, template: str):
    def write(folder: Path):
        F.sentencepiece_dir(real_file(fam, folder), str(folder), template)
    return write


def gemma_tokenizer(folder: Path):
    F.sentencepiece_dir(real_file("llama2", folder), str(folder), GEMMA_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.save_pretrained(folder)


def llama3_tokenizer(folder: Path):
    F.llama3_dir(real_file("llama3", folder), str(folder))


def qwen_tokenizer(folder: Path):
    if GGUF_PATH is None:
        pytest.skip("the embedded SmolLM2 GGUF (its vocabulary makes the Qwen2-style tokenizer) is not here")
    import gguf
    F.qwen2_dir(gguf.GGUFReader(GGUF_PATH), str(folder))


# ---- the tiny random models: {family: a function (vocab size) -> a transformers model} ----------------

def common(vocab: int, **kw) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, **kw)


WINDOW = 16   # shorter than the training rows and the IV prompts: the sliding window is used

FAMILIES = {
    "llama2": (sentencepiece_tokenizer("llama2", F.LLAMA2_TEMPLATE),
               lambda v: transformers.LlamaForCausalLM(transformers.LlamaConfig(**common(v)))),
    "mistral3": (sentencepiece_tokenizer("mistral3", F.MISTRAL3_TEMPLATE),
                 lambda v: transformers.MistralForCausalLM(transformers.MistralConfig(
                     **common(v, sliding_window=WINDOW)))),
    "qwen2": (qwen_tokenizer, lambda v: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **common(v, tie_word_embeddings=True)))),
    "qwen3": (qwen_tokenizer, lambda v: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **common(v, head_dim=16, tie_word_embeddings=True)))),
    "gemma3": (gemma_tokenizer, lambda v: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **common(v, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                 layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0)))),
    "llama3": (llama3_tokenizer, lambda v: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **common(v, rope_theta=500000.0, tie_word_embeddings=False,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})))),
}


def model_dir(fam: str, root: Path) -> Path:
    """The family's tokenizer files, then a tiny random model of its architecture saved beside them."""
    write_tokenizer, make_model = FAMILIES[fam]
    folder = root / fam
    folder.mkdir()
    write_tokenizer(folder)
    vocab = len(transformers.AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(0)
    hf = make_model(vocab)
    randomize(hf, std=0.05)     # HF's 0.02 init with unit norms gives near-uniform logits that hide errors
    hf.save_pretrained(folder)
    return folder


# ---- the tasks --------------------------------------------------------------------------------------

WORDS = ["cat", "dog", "sun", "red", "box", "hat", "pen", "cup", "map", "owl", "fig", "jam"]


def write_task(folder: Path, name: str, fn, seed: int, n_train=16, n_test=4) -> str:
    """A task in the suite's own layout, <name>.train.jsonl + <name>.test.jsonl (tasks.load_task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_train + n_test):
        w = rng.choice(WORDS) + rng.choice(WORDS)[: rng.randint(0, 3)]
        rows.append(json.dumps({"instruction": f"Task {name}: do it.", "input": w, "output": fn(w)}))
    (folder / f"{name}.train.jsonl").write_text("\n".join(rows[:n_train]) + "\n")
    (folder / f"{name}.test.jsonl").write_text("\n".join(rows[n_train:]) + "\n")
    return str(folder / f"{name}.train.jsonl")


# ---- the runs ---------------------------------------------------------------------------------------

def logits(model_or_hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model_or_hf(torch.tensor([ids]))
    return getattr(out, "logits", out)[0]


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_guided_run_and_extraction(fam, tmp_path):
    folder = model_dir(fam, tmp_path)
    tasks = [write_task(tmp_path, "a", str.upper, 1), write_task(tmp_path, "b", lambda w: w[::-1], 2)]
    out = tmp_path / "run"
    results = train.main([
        "--guided", "--model", str(folder), "--tasks", ",".join(tasks), "--general", "none", "--out_dir", str(out),
        "--max_steps", "2", "--batch_size", "2", "--micro_batch", "2", "--lr", "1e-3", "--warmup", "0",
        "--eval_n", "2", "--eval_k_shot", "0", "--iv_n_clean", "4", "--iv_n_corrupt", "4", "--iv_top_k", "2",
        "--iv_layer", "1", "--iv_dir", str(tmp_path / "ivs"), "--dtype", "fp32", "--num_threads", "1"])
    assert isinstance(results, dict), f"{fam}: train.py did not finish: {results!r}"
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["stages"]) == 3, f"{fam}: stages {[s.get('tasks') for s in saved['stages']]}"

    # the last stage opens in transformers, as the family's class, with our model's logits
    ours, tok = load_model(out / "stage-2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "stage-2").eval()
    assert json.loads((folder / "config.json").read_text())["architectures"] == [type(hf).__name__]
    # the exported tokenizer and template, read by transformers, give the source folder's chat ids and ours
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Task a: do it.\n\ncatdo owl"}]
    chat_ids = [transformers.AutoTokenizer.from_pretrained(f).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False) for f in (folder, out / "stage-2")]
    assert tok.chat_prompt(messages[1]["content"], system="Be brief.") == list(chat_ids[0]) == list(chat_ids[1]), \
        f"{fam}: chat prompt ids differ (ours, source folder, stage-2 folder)"
    ids = list(chat_ids[0]) + tok.encode("CATDO OWL")
    assert len(ids) > WINDOW, "the prompt should outgrow the sliding window"
    got, want = logits(ours, ids), logits(hf, ids)
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"{fam}: stage-2 logits, ours vs transformers: max |diff| = {diff:.2e}"
    # ... and training changed them: the run did not just copy the base model
    base, _ = load_model(folder)
    assert (logits(base, ids) - got).abs().max() > 1e-4, f"{fam}: stage-2 equals the base model"

    # extract_iv.py on the same directory, through the chat template
    iv_path = tmp_path / "a.safetensors"
    rc = extract_iv.main(["--task", tasks[0], "--model", str(folder), "--out", str(iv_path), "--format", "chat",
                          "--n_clean", "4", "--n_corrupt", "4", "--shots", "2", "--top_k", "2", "--layer", "1",
                          "--dtype", "fp32", "--threads", "1", "--quiet"])
    assert rc == 0 and iv_path.exists(), f"{fam}: extract_iv.py returned {rc}"
    iv, layer, _ = load_iv(iv_path, base)
    assert tuple(iv.shape) == (base.config.hidden_size,) and layer == 1
    assert torch.isfinite(iv).all() and iv.norm() > 0
