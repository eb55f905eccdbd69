"""Toys shared by the tests of evaluate.py, ivft.prompts and ivft.engine: a character-level
tokenizer with a ChatML-style template, tiny random models, and a model whose log-probabilities
are known in closed form."""
import math

import torch

from model import ModelConfig, Transformer
from ivft.tasks import Task


# ---- a character-level tokenizer with a ChatML-style template --------------------------------------
# Every character is one token, so hand computations can follow the ids.

class CharTok:
    chars = "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'-\""
    special_tokens = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    bos_id, eos_id, pad_id = 1, 2, 2
    chat_format = "chatml"

    def encode(self, text):
        return [3 + self.chars.index(c) for c in text]

    def decode(self, ids):
        names = {i: t for t, i in self.special_tokens.items()}
        # ids past the alphabet (a random model may emit them) decode as U+FFFD, like stray bytes
        return "".join(names[i] if i < 3 else (self.chars + "\ufffd" * V)[i - 3] for i in ids)

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
V = 80  # >= 3 + len(CharTok.chars)


def tiny_model(seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    return Transformer(cfg).init_weights(std=0.2).eval()


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
    return 2 if ch == "E" else TOK.encode(ch)[0]  # "E" stands for <|im_end|> in the tables below


def lp(L, cur, nxt):
    """log P(nxt | cur) by hand: L[cur, nxt] - log(sum_k exp L[cur, k])."""
    row = L[tid(cur)].tolist()
    return row[tid(nxt)] - math.log(sum(math.exp(x) for x in row))


def naive_score(model, prompt, cont):
    with torch.no_grad():
        logp = model(torch.tensor([prompt + cont])).float().log_softmax(-1)[0]
    return sum(logp[len(prompt) - 1 + k, c].item() for k, c in enumerate(cont))


def make_task(test, train=(), name="toy", metric="choice"):
    return Task(name=name, kind="test", metric=metric, train=list(train), test=list(test), description="toy task")
