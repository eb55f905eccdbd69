"""Chat templates: a checkpoint's own jinja template turns a conversation into the prompt text.

A checkpoint is data, not code, so its template runs in jinja2's immutable sandbox with the settings
transformers' apply_chat_template uses (trim_blocks, lstrip_blocks, the loopcontrols extension, a
`tojson` filter that keeps non-ASCII text, `raise_exception` and `strftime_now`): the same template
then renders the same text here and there. Where the template comes from (first found wins):
a file given by the user (the --chat_template flag), `chat_template.jinja` (transformers >= 4.50),
`tokenizer_config.json`'s "chat_template", a GGUF's `tokenizer.chat_template`.

A model without any (a base model) gets PLAIN_TEMPLATE, "Q: ...\\nA: ..." blocks, and a one-line note.
The tokenizer turns the rendered text into ids (Tokenizer.render_chat): control tokens the template
wrote become their ids, the same text typed in a message stays text.
"""
import datetime
import functools
import json

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The format of a model with no template: a system message as a first paragraph, then blocks
# "Q: <user>\nA: <assistant>" separated by a blank line; a prompt ends with "A:", and the answer
# follows after one space (Tokenizer.answer_prefix). add_generation_prompt has nothing to add.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\nA:' }}"
    "{% else %}{{ ' ' + m['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}")


class TemplateError(ValueError):
    """A chat template that does not parse or refuses the conversation; one line."""


def _raise_exception(message):
    # templates call this to refuse a conversation (e.g. roles that do not alternate)
    raise TemplateError(f"chat template refused the conversation: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & for HTML; transformers replaces it by plain json.dumps
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def compile_template(source: str, where: str):
    """The jinja Template for `source`; `where` names its file and field in the error line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{where}: chat template does not parse (line {e.lineno}: {e.message})") from None


def render(template, messages: list[dict], add_generation_prompt: bool, where: str, **special) -> str:
    """The prompt text. `special`: bos_token, eos_token, ... as the template names them."""
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:  # undefined variables, sandbox violations, bad filters
        raise TemplateError(f"{where}: chat template failed ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=1)
def plain_template():
    return compile_template(PLAIN_TEMPLATE, "plain format")


# every script's --chat_template flag
FLAG_HELP = ("a jinja chat template (.jinja, or JSON with \"chat_template\") instead of the checkpoint's own; "
             "a model without one gets the plain Q:/A: format")


def read_template_file(path) -> str:
    """A user's own template (--chat_template FILE): a .jinja file, or a tokenizer_config.json-style
    JSON file with a "chat_template" string."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TemplateError(f"{path}: cannot read the chat template ({e.strerror})") from None
    if str(path).endswith(".json"):
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TemplateError(f"{path}: no \"chat_template\" string in this JSON file") from None
        if not isinstance(text, str):
            raise TemplateError(f"{path}: \"chat_template\" is not a string (named templates are not supported)")
    compile_template(text, str(path))  # refuse a broken file now, not in the middle of a run
    return text
