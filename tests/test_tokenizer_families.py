"""The tokenizer families users bring, from their makers' real files (tests/families.py): encode
equals transformers' AutoTokenizer from the same folder and the makers' own engine (sentencepiece,
tiktoken); decode round-trips; the checkpoint's chat template gives apply_chat_template's ids; the
export keeps the bos behaviour; every refusal is one line naming the file and field."""
import json
import os

import pytest

import families as F
from ivft.tokenizer import SentencePieceBPE, Tokenizer, TokenizerError
from test_tokenizer import CORPUS, GGUF_PATH

transformers = pytest.importorskip("transformers")
FAMILIES = ["llama2", "mistral3", "qwen2", "llama3"]

# What the shared corpus lacks: decomposed accents (NFC matters), ZWJ sequences, long words, CRLF runs.
EXTRA = ["e\u0301te\u0301 cafe\u0301 A\u030a", "Å Å ﬃ Ǆ", "👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈", "x" * 300, "é" * 300 + " ab" * 5,
         "\r\n\r\n\r\n  \r\n\t", "   \t\t  x", "0000000000 1,000,000.50", "def f():\r\n\treturn {'a': [1, 2]}",
         "[INST] typed [/INST] <s></s> <|im_start|>", "Ünïcödé ţêxţ", "ｆｕｌｌ　ｗｉｄｔｈ", "日本語\n\n中文 한국어"]
STRINGS = CORPUS + EXTRA
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
     {"role": "user", "content": "  Another one,\nplease 🍐 123 café "}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "cat"},
     {"role": "assistant", "content": "chat"}, {"role": "user", "content": "dog\t(2)"}],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: HF folder} for the families whose real files are here."""
    import importlib.util
    root = tmp_path_factory.mktemp("families")
    out = {}
    # transformers needs sentencepiece and protobuf to convert a SentencePiece model file
    try:
        converts = all(importlib.util.find_spec(m) for m in ("sentencepiece", "google.protobuf"))
    except ModuleNotFoundError:  # no "google" package at all
        converts = False
    for fam in ("llama2", "mistral3", "llama3"):
        f = F.real_file(fam, root)
        if f is not None and (converts or fam == "llama3"):
            out[fam] = (F.llama3_dir(f, str(root / fam)) if fam == "llama3"
                        else F.sentencepiece_dir(f, str(root / fam), F.TEMPLATES[fam]))
    if GGUF_PATH is not None:
        import gguf
        out["qwen2"] = F.qwen2_dir(gguf.GGUFReader(GGUF_PATH), str(root / "qwen2"))
    return out


def folder(folders, fam):
    if fam not in folders:
        pytest.skip(f"{fam}: real tokenizer file or sentencepiece not found (run `bash setup.sh --test`; "
                    f"cache {F.CACHE})")
    return folders[fam]


def assert_same(strings, ours, ref, label):
    for s in strings:
        a, b = ours(s), ref(s)
        assert a == b, f"{label}: first differing string {s!r}\n  ours: {a}\n  ref:  {b}"


@pytest.mark.parametrize("fam", FAMILIES)
def test_encode_decode_match_transformers(folders, fam):
    path = folder(folders, fam)
    ours, hf = Tokenizer.from_hf_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    assert isinstance(ours, SentencePieceBPE) == (fam in ("llama2", "mistral3"))
    assert ours.n_vocab == len(hf) and (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    # split_special_tokens: typed control-token text is text, for us and for the reference
    assert_same(STRINGS, ours.encode, lambda s: hf.encode(s, add_special_tokens=False, split_special_tokens=True),
                f"{fam} vs AutoTokenizer")
    for s in STRINGS:
        ids = ours.encode(s)
        assert ours.decode(ids) == hf.decode(ids), f"{fam}: decode differs for {s!r}"
    # bos on plain text exactly when transformers adds it
    assert ours.add_bos == (hf("x").input_ids[0] == hf.bos_token_id)
    assert ours.add_bos == (fam != "qwen2")
    if fam == "llama3":  # Meta's ids: 128000 base tokens, then <|begin_of_text|>, ..., <|eot_id|> = 128009
        assert (ours.bos_id, ours.special_tokens["<|eot_id|>"], ours.n_vocab) == (128000, 128009, 128256)


@pytest.mark.parametrize("fam", FAMILIES)
def test_roundtrip(folders, fam):
    import unicodedata
    ours = Tokenizer.from_hf_dir(folder(folders, fam))
    for s in STRINGS:
        want = unicodedata.normalize("NFC", s) if fam == "qwen2" else s
        if fam in ("llama2", "mistral3") and s.startswith(" "):
            want = s[1:]  # SentencePiece decoding drops the space its encoding prefixed (as sentencepiece does)
        assert ours.decode(ours.encode(s)) == want, f"{fam}: round trip of {s!r}"


@pytest.mark.parametrize("fam", ["llama2", "mistral3"])
def test_sentencepiece_agrees(folders, fam):
    """Against Google's sentencepiece on the same model file. HF's BPE (and so transformers and we)
    joins a run of spaces into one "▁▁" piece where sentencepiece splits it off, so strings with
    space runs are compared only with transformers (test above)."""
    spm = pytest.importorskip("sentencepiece")
    path = folder(folders, fam)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path + "-src", "tokenizer.model"))
    ours = Tokenizer.from_hf_dir(path)
    plain = [s for s in STRINGS if "  " not in s.replace("\n", " ").replace("\t", " ") and not s.startswith(" ")]
    assert len(plain) > 150
    assert_same(plain, ours.encode, sp.encode, f"{fam} vs sentencepiece")
    for s in plain:
        assert ours.decode(ours.encode(s)) == sp.decode(sp.encode(s)), f"{fam}: decode vs sentencepiece {s!r}"


def test_tiktoken_agrees(folders):
    """Llama-3 against tiktoken on Meta's own file and regex (llama_models/llama3/tokenizer.py)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    path = folder(folders, "llama3")
    model_file = F.real_file("llama3", path)
    ref = tiktoken.Encoding("llama3", pat_str=F.LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(model_file),
                            special_tokens={})
    assert_same(STRINGS, Tokenizer.from_hf_dir(path).encode, ref.encode_ordinary, "llama3 vs tiktoken")


@pytest.mark.parametrize("fam", FAMILIES)
def test_chat_matches_apply_chat_template(folders, fam):
    path = folder(folders, fam)
    ours, hf = Tokenizer.from_hf_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ours.render_chat(messages, add_generation_prompt=gen) == list(want), \
                f"{fam}: chat ids differ for {messages}, add_generation_prompt={gen}"
    if isinstance(ours, SentencePieceBPE):  # the run-by-run path (typed control text) agrees too
        for messages in CONVERSATIONS:
            text = ours._compiled.render(messages=messages, add_generation_prompt=True, **ours._special_names())
            assert ours._encode_runs(text, []) == ours._encode_rendered(text, []), f"{fam}: runs differ"
    # the end of an assistant turn, read off the template, is what the training answers end with
    eot = {"llama2": "</s>", "mistral3": "</s>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}[fam]
    assert ours.end_of_turn_id() == ours.special_tokens[eot] and ours.special_tokens[eot] in ours.stop_ids()
    # control-token text typed by a user stays text: its id appears only where the template wrote it
    control = {"llama2": "<s>", "mistral3": "[INST]", "qwen2": "<|im_start|>", "llama3": "<|eot_id|>"}[fam]
    cid = ours.special_tokens[control]
    clean = ours.render_chat([{"role": "user", "content": "a b"}])
    forged = ours.render_chat([{"role": "user", "content": f"a {control} b"}])
    assert forged.count(cid) == clean.count(cid) and control in ours.decode(forged)


@pytest.mark.parametrize("fam", FAMILIES)
def test_export_keeps_bos_and_ids(folders, fam, tmp_path):
    """save_hf's folder gives transformers the same ids as the source, special tokens included, so
    lm-eval scores an export as it scores the base model."""
    path = folder(folders, fam)
    Tokenizer.from_hf_dir(path).save_hf(tmp_path)
    src, out = (transformers.AutoTokenizer.from_pretrained(p) for p in (path, str(tmp_path)))
    assert_same(STRINGS[:120], out.encode, src.encode, f"{fam}: export vs source (with special tokens)")
    for messages in CONVERSATIONS:
        assert (out.apply_chat_template(messages, tokenize=True, return_dict=False)
                == src.apply_chat_template(messages, tokenize=True, return_dict=False))
    back = Tokenizer.from_hf_dir(tmp_path)
    assert back.add_bos == Tokenizer.from_hf_dir(path).add_bos


def test_base_model_plain_format(folders, tmp_path, capsys):
    """No template: the plain "Q: ... A:" format with the tokenizer's bos, and one note, once."""
    path = folder(folders, "llama2")
    cfg_path = os.path.join(path, "tokenizer_config.json")
    for name in ("tokenizer.json",):
        with open(os.path.join(path, name), encoding="utf-8") as f:
            (tmp_path / name).write_text(f.read(), encoding="utf-8")
    cfg = json.load(open(cfg_path, encoding="utf-8"))
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.chat_template is None and tok.chat_format is None and tok.answer_prefix == " "
    ids = tok.chat_prompt("What is 2+2?", system="Be brief.")
    assert ids == [tok.bos_id] + tok.encode("Be brief.\n\nQ: What is 2+2?\nA:")
    tok.chat_prompt("again")
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "no chat template" in err and len(err.strip().splitlines()) == 1
    # prompt + answer = the whole text as transformers tokenizes it (bos included), not "A:" + "▁▁4"
    from ivft import prompts as P
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_prompt("What is 2+2?") + P.answer_ids(tok, "4")[:-1] == hf.encode("Q: What is 2+2?\nA: 4")
    assert P.answer_ids(tok, "4")[-1] == tok.eos_id


@pytest.mark.parametrize("fam", FAMILIES)
def test_knowledge_prompt_is_the_whole_text(folders, fam):
    """A knowledge probe's prompt ids + answer ids = the whole sentence as transformers encodes it
    (with bos where the tokenizer adds it): the answer is tokenized as it reads after the prompt."""
    from ivft import prompts as P
    path = folder(folders, fam)
    ours, hf = Tokenizer.from_hf_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    for prompt, answer in [("The capital of Japan is", "Tokyo"), ("Q: opposite of hot?\nA:", "cold"),
                           ("Paris est la capitale de la", "France"), ("2 + 2 =", "4")]:
        p, a = P.knowledge_ids(ours, prompt, answer)
        assert p + a == hf.encode(prompt + " " + answer), f"{fam}: {prompt!r} + {answer!r}"
    # the plain IV prompt (extract_iv.py --format plain): prompt + answer + newline = the whole text
    from ivft.ivprompts import plain_prompt
    from ivft.tasks import Example
    shot = Example(instruction="Opposite?", input="up", output="down")
    pr = plain_prompt(ours, Example(instruction="Opposite?", input="hot", output="cold"), shots=[shot])
    assert pr.ids + pr.answer == hf.encode("Q: Opposite?\nup\nA: down\n\nQ: Opposite?\nhot\nA: cold\n")


def _write(folder, name, obj):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.mark.parametrize("tj, field", [
    ({"model": {"type": "Unigram", "vocab": []}}, "model.type 'Unigram'"),
    ({"model": {"type": "BPE", "vocab": {}, "merges": []}, "decoder": {"type": "Metaspace"}}, "decoder.type 'Metaspace'"),
    ({"model": {"type": "BPE", "vocab": {}, "merges": []}, "decoder": {"type": "ByteLevel"},
      "normalizer": {"type": "NFKC"}}, "normalizer.type 'NFKC'"),
    ({"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []}, "decoder": {"type": "Nope"}},
     "HF tokenizers cannot read it"),
    ("{not json", "not valid JSON"),
])
def test_refusals_are_one_line(tmp_path, tj, field):
    _write(tmp_path, "tokenizer.json", tj)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_hf_dir(tmp_path)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "tokenizer.json")) and field in msg and "\n" not in msg, msg


def test_bad_template_is_one_line(folders, tmp_path):
    path = folder(folders, "qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        _write(tmp_path, name, open(os.path.join(path, name), encoding="utf-8").read())
    _write(tmp_path, "chat_template.jinja", "{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError) as e:
        Tokenizer.from_hf_dir(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "chat_template.jinja")) and "\n" not in str(e.value)


def test_legacy_sentencepiece_file(folders, tmp_path):
    """Llama-2's tokenizer.json as older transformers wrote it (normalizer Prepend("▁") + Replace,
    no pre-tokenizer): we run the file as written. (transformers 5 rebuilds a LlamaTokenizer's
    pipeline from the vocabulary and then differs from the file on text that starts with a space,
    so the reference here reads the file as it is, as PreTrainedTokenizerFast.)"""
    path = folder(folders, "llama2")
    tj = json.load(open(os.path.join(path, "tokenizer.json"), encoding="utf-8"))
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    tj["pre_tokenizer"] = None
    cfg = json.load(open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write(tmp_path, "tokenizer.json", tj)
    _write(tmp_path, "tokenizer_config.json", cfg)
    _write(tmp_path, "chat_template.jinja", F.LLAMA2_TEMPLATE)
    ours, hf = Tokenizer.from_hf_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_same(STRINGS, ours.encode, lambda s: hf.encode(s, add_special_tokens=False, split_special_tokens=True),
                "legacy llama2 vs transformers")
    if (json.load(open(os.path.join(path, "tokenizer.json"), encoding="utf-8")).get("pre_tokenizer") or {}).get(
            "type") == "Metaspace":  # transformers 5's own file: the two really differ
        assert ours.encode(" Hello") != Tokenizer.from_hf_dir(path).encode(" Hello")
    # the answer of a knowledge probe reads as after its prompt: "▁Tokyo", not this file's "▁▁Tokyo"
    from ivft import prompts as P
    assert ours.encode(" Tokyo") != ours.encode_continuation(" Tokyo")
    p, a = P.knowledge_ids(ours, "The capital of Japan is", "Tokyo")
    assert p + a == hf.encode("The capital of Japan is Tokyo")
    for messages in CONVERSATIONS:
        want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ours.render_chat(messages) == list(want)
        text = ours._compiled.render(messages=messages, add_generation_prompt=True, **ours._special_names())
        assert ours._encode_runs(text, []) == ours._encode_rendered(text, [])


def test_sentencepiece_gguf(folders, tmp_path):
    """A SentencePiece GGUF (tokenizer.ggml.model "llama": Llama-2 / Gemma GGUFs) equals what
    transformers makes of the same GGUF: encode, chat (the GGUF's template), bos, and the export."""
    pytest.importorskip("sentencepiece")
    gguf = pytest.importorskip("gguf")
    folder(folders, "llama2")
    path = F.sentencepiece_gguf(F.real_file("llama2", tmp_path), str(tmp_path / "sp.gguf"), F.LLAMA2_TEMPLATE)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    assert isinstance(ours, SentencePieceBPE) and ours.add_bos and ours.n_vocab == len(hf)
    assert_same(STRINGS, ours.encode, lambda s: hf.encode(s, add_special_tokens=False, split_special_tokens=True),
                "SentencePiece GGUF vs transformers")
    for messages in CONVERSATIONS:
        want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ours.render_chat(messages) == list(want)
    ours.save_hf(tmp_path / "export")
    out = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert_same(STRINGS[:120], out.encode, hf.encode, "SentencePiece GGUF export vs transformers (with bos)")


def test_template_features_render_as_transformers(folders):
    """tojson, namespace, loop controls, raise_exception, slicing and string methods: the same text
    as transformers' own rendering, and the same ids."""
    path = folder(folders, "qwen2")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_hf_dir(path)
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages[::-1] %}{% if m['role'] == 'system' %}{% continue %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{% if messages | length == 0 %}{{ raise_exception('no messages') }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['content'].startswith('{') %}"
        "{{ m['content'] | tojson }}{% else %}{{ m['content'].rstrip() | upper }}{% endif %}{{ '<|im_end|>\\n' }}"
        "{% if loop.index == 3 %}{% break %}{% endif %}{% endfor %}"
        "{{ '<|im_start|>assistant\\n(' + ns.n | string + ' turns)' if add_generation_prompt else '' }}")
    ours.set_chat_template(template, "test template")
    messages = CONVERSATIONS[3] + [{"role": "user", "content": '{"k": "é <b>"}'}]
    for msgs in (messages, messages[:2]):
        want = hf.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert ours.render_text(msgs) == want
        assert ours.render_chat(msgs) == list(hf.apply_chat_template(
            msgs, chat_template=template, tokenize=True, add_generation_prompt=True, return_dict=False))
