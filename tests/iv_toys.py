"""Toys shared by the tests of extract_iv.py and its ivft modules (ivsettings, ivprompts, ivfile,
ivcheck): a tiny random Llama, a character tokenizer with ChatML-style turns, and an antonym task."""
import torch

from ivft.tasks import Example, Task
from model import ModelConfig, Transformer


# ---- tiny models and a character tokenizer --------------------------------------------------------

def llama_tiny(seed=0, dtype=torch.float32, vocab=64):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    # std 0.3: large enough that heads have visible, non-linear effects on the output
    return Transformer(cfg).init_weights(std=0.3).to(dtype).eval()


class CharTok:
    """One token per character, ChatML-style turns: enough of tokenizer.Tokenizer for the pipeline."""
    chars = "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'-\"()"
    special_tokens = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    bos_id, eos_id, pad_id = 1, 2, 2
    chat_format = "chatml"

    def encode(self, text):
        return [3 + self.chars.index(c) for c in text if c in self.chars]

    def decode(self, ids):
        return "".join(self.chars[i - 3] for i in ids if i >= 3)

    def render_chat(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            ids += [1] + self.encode(f"{m['role']}\n{m['content']}") + [2] + self.encode("\n")
        return ids + ([1] + self.encode("assistant\n") if add_generation_prompt else [])

    def stop_ids(self):
        return {0, 2}


TOK = CharTok()
PAIRS = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("wet", "dry"),
         ("old", "new"), ("high", "low"), ("rich", "poor"), ("hard", "soft"), ("open", "shut"),
         ("early", "late"), ("light", "dark"), ("full", "empty"), ("thick", "thin")]


def standin_task(name="opp", instruction="Say the opposite."):
    ex = [Example(instruction=instruction, input=a, output=b) for a, b in PAIRS]
    return Task(name=name, kind="generate", metric="exact_match", train=ex[:10], test=ex[10:])


def char_model(seed=0):
    return llama_tiny(seed, vocab=3 + len(CharTok.chars))


SMALL = dict(n_clean=4, n_corrupt=4, batch_size=4)
