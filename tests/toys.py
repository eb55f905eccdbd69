"""The toys the tests share: a character tokenizer with ChatML-style turns, a byte-level tokenizer,
tiny random models, a model whose log-probabilities are known in closed form, and an antonym task."""
import math

import torch

from ivft.tasks import Example, Task
from ivft.tokenizer import GPT2_PATTERN, Tokenizer
from model import ModelConfig, Transformer


# ---- tokenizers ------------------------------------------------------------------------------------

class CharTok:
    """One token per character, so hand computations can follow the ids; ChatML-style turns: enough
    of ivft.tokenizer.Tokenizer for the pipeline.

    show_control: decode writes the control tokens by name, as the real tokenizer does (the prompt
    tests read the template back from the text). TEXT_TOK decodes without them, to the turns' text
    only: the corruption test of ivft.ivprompts splits a decoded prompt into demonstrations at
    "user\n" and reads each one's first line as its input."""
    chars = "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'-\""
    special_tokens = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    bos_id, eos_id, pad_id = 1, 2, 2
    chat_format = "chatml"

    def __init__(self, show_control: bool = True):
        self.show_control = show_control

    def encode(self, text):
        unknown = set(text) - set(self.chars)
        if unknown:  # a character outside the alphabet is a mistake in the test, not text to drop
            raise ValueError(f"CharTok has no token for {''.join(sorted(unknown))!r}")
        return [3 + self.chars.index(c) for c in text]

    def decode(self, ids):
        names = {i: t for t, i in self.special_tokens.items()} if self.show_control else {}
        # ids past the alphabet (a random model may emit them) decode as U+FFFD, like stray bytes
        return "".join(names.get(i, "") if i < 3 else self.chars[i - 3] if i - 3 < len(self.chars)
                       else "\ufffd" for i in ids)

    def render_chat(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            ids += [1] + self.encode(f"{m['role']}\n{m['content']}") + [2] + self.encode("\n")
        if add_generation_prompt:
            ids += [1] + self.encode("assistant\n")
        return ids

    def stop_ids(self):
        return {0, 2}


TOK = CharTok()
TEXT_TOK = CharTok(show_control=False)
V = 80  # the vocabulary of tiny_model: >= 3 + len(CharTok.chars), so a random model can emit stray ids


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens + the three ChatML control tokens: the chat format of SmolLM2, a vocab of 259."""
    ranks = {bytes([b]): b for b in range(256)}
    special = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return Tokenizer(ranks, special, GPT2_PATTERN, merges=[], bos_id=257, eos_id=258, pad_id=258, chat_template=chatml)


# ---- tiny random models -----------------------------------------------------------------------------

def tiny_model(seed=0, vocab=V, layers=2, std=0.2, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    return Transformer(cfg).init_weights(std=std).to(dtype).eval()


def llama_tiny(seed=0, dtype=torch.float32, vocab=64):
    # the IV tests' model: 4 layers, and std 0.3, large enough that heads have visible, non-linear
    # effects on the output
    return tiny_model(seed, vocab, layers=4, std=0.3, dtype=dtype)


def char_model(seed=0):
    return llama_tiny(seed, vocab=3 + len(CharTok.chars))


def bigram_model(logit_table: dict):
    """A model whose next-token logits depend only on the current token: logits(next | cur) =
    L[cur], with L zero except for logit_table {(cur_char, next_char): value}. The block's attention
    and MLP write nothing (o_proj, down_proj = 0), the embedding is the identity (C = V), RMSNorm
    maps e_i to sqrt(V)·e_i, so lm_head.weight = L^T / sqrt(V) gives exactly those logits."""
    cfg = ModelConfig(vocab_size=V, hidden_size=V, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, head_dim=8, norm_eps=0.0)  # eps 0: exact sqrt(V) scale
    m = Transformer(cfg).init_weights()
    L = torch.zeros(V, V)
    for (cur, nxt), value in logit_table.items():
        L[tid(cur), tid(nxt)] = value
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.eye(V))
        m.model.layers[0].self_attn.o_proj.weight.zero_()
        m.model.layers[0].mlp.down_proj.weight.zero_()
        m.lm_head.weight.copy_(L.T / math.sqrt(V))
    return m.eval(), L


def tid(ch):
    return 2 if ch == "E" else TOK.encode(ch)[0]  # "E" stands for <|im_end|> in the tables of the tests


def lp(L, cur, nxt):
    """log P(nxt | cur) by hand: L[cur, nxt] - log(sum_k exp L[cur, k])."""
    row = L[tid(cur)].tolist()
    return row[tid(nxt)] - math.log(sum(math.exp(x) for x in row))


def naive_score(model, prompt, cont):
    with torch.no_grad():
        logp = model(torch.tensor([prompt + cont])).float().log_softmax(-1)[0]
    return sum(logp[len(prompt) - 1 + k, c].item() for k, c in enumerate(cont))


# ---- tasks -----------------------------------------------------------------------------------------

PAIRS = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("wet", "dry"),
         ("old", "new"), ("high", "low"), ("rich", "poor"), ("hard", "soft"), ("open", "shut"),
         ("early", "late"), ("light", "dark"), ("full", "empty"), ("thick", "thin")]
SMALL = dict(n_clean=4, n_corrupt=4, batch_size=4)  # extraction settings small enough for a test


def standin_task(name="opp", instruction="Say the opposite."):
    ex = [Example(instruction=instruction, input=a, output=b) for a, b in PAIRS]
    return Task(name=name, kind="generate", metric="exact_match", train=ex[:10], test=ex[10:])


def make_task(test, train=(), name="toy", metric="choice"):
    return Task(name=name, kind="test", metric=metric, train=list(train), test=list(test),
                description="toy task")
