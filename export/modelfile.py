"""Ollama's Modelfile for a GGUF: FROM the file, the chat template in Go template syntax, and
the stop tokens, so `ollama create NAME -f Modelfile` is the one step left.

The Jinja chat template is not translated as text (Jinja and Go templates differ too much);
it is *measured*: rendered with marker contents, the renders give each role's prefix and
suffix, the generation prompt, a default system block (SmolLM2 and Qwen add one when the
conversation has none) and a leading BOS. That fits templates that wrap each message on its own
(ChatML, Llama 3, Phi-3, Zephyr-style ones). The result is checked by replaying it in Python
against the Jinja render on several conversations; a template that does not fit (Gemma's,
which folds the system prompt into the first user turn; Mistral's, which moves it to the last)
gets no TEMPLATE line and a comment saying so, never a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

X, Y, Z = "\x01SYS\x01", "\x01USR\x01", "\x01AST\x01"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Wrappers:
    prefix: dict  # role -> text before the content
    suffix: dict  # role -> text after it
    generation: str  # what add_generation_prompt appends
    default_system: str  # the block added when the first message is not a system one
    preamble: str  # the template's own leading BOS ("" if none)
    bos_added: bool  # the tokenizer adds that BOS itself, so the Go template leaves it out


def _render(tokenizer, messages: list, gen: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _cut(text: str, head: str, marker: str) -> tuple[str, str]:
    """(before, after) `marker` in `text`, which must start with `head`."""
    if not text.startswith(head) or text.count(marker) != 1:
        raise ValueError("not a per-message template")
    rest = text[len(head):]
    return rest.split(marker)[0], rest.split(marker)[1]


def measure(tokenizer) -> Wrappers:
    """The per-role wrappers of the tokenizer's chat template; ValueError when it has none."""
    msg = lambda role, text: {"role": role, "content": text}  # noqa: E731
    s = _render(tokenizer, [msg("system", X)])
    su = _render(tokenizer, [msg("system", X), msg("user", Y)])
    sua = _render(tokenizer, [msg("system", X), msg("user", Y), msg("assistant", Z)])
    head, sys_suffix = s.split(X) if s.count(X) == 1 else ("", "")
    if not sys_suffix and not head:
        raise ValueError("no system message in the render")
    bos = getattr(tokenizer, "bos_token", None) or ""
    # the BOS is the template's own only where it writes `bos_token` (ChatML's first marker
    # can be the BOS token itself and still be the system prefix)
    preamble = bos if bos and head.startswith(bos) and "bos_token" in tokenizer.chat_template else ""
    ids = tokenizer("x").input_ids
    bos_added = bool(ids) and ids[0] == tokenizer.bos_token_id
    user_prefix, user_suffix = _cut(su, s, Y)
    asst_prefix, asst_suffix = _cut(sua, su, Z)
    generation = _render(tokenizer, [msg("system", X), msg("user", Y)], gen=True)[len(su):]
    u = _render(tokenizer, [msg("user", Y)])
    if not u.startswith(preamble) or (user_prefix + Y) not in u:
        raise ValueError("the user turn renders differently without a system message")
    default_system = u[len(preamble):u.index(user_prefix + Y)]
    return Wrappers({"system": head[len(preamble):], "user": user_prefix,
                     "assistant": asst_prefix},
                    {"system": sys_suffix, "user": user_suffix, "assistant": asst_suffix},
                    generation, default_system, preamble, bos_added)


def replay(w: Wrappers, messages: list, gen: bool) -> str:
    """What the Go template below renders, in Python, with the BOS that llama.cpp adds."""
    text = w.preamble
    if not messages or messages[0]["role"] != "system":
        text += w.default_system
    for m in messages:
        text += w.prefix[m["role"]] + m["content"] + w.suffix[m["role"]]
    if gen and messages and messages[-1]["role"] != "assistant":
        text += w.generation
    return text


def conversations() -> list[tuple[list, bool]]:
    sys_ = {"role": "system", "content": "You answer briefly."}
    turns = [{"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "4."},
             {"role": "user", "content": "And 3+3?"}]
    return [([sys_] + turns, True), (turns, True), (turns[:2], False), ([sys_] + turns[:2], False),
            (turns[:1], True)]


def go_template(w: Wrappers) -> str:
    """The Ollama TEMPLATE: no whitespace-trimming actions, so the literal text stays exact."""
    def lit(text: str) -> str:
        if "{{" in text or '"""' in text:
            raise ValueError("the template text has '{{' or '\"\"\"'")
        return text

    parts = [] if w.bos_added else [lit(w.preamble)]
    if w.default_system:
        parts.append('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                     f'{lit(w.default_system)}{{{{ end }}}}')
    parts.append("{{ range $i, $m := .Messages }}")
    for n, role in enumerate(ROLES):
        keyword = "if" if n == 0 else "else if"
        parts.append(f'{{{{ {keyword} eq $m.Role "{role}" }}}}{lit(w.prefix[role])}'
                     f'{{{{ $m.Content }}}}{lit(w.suffix[role])}')
    parts.append("{{ end }}")
    parts.append('{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}'
                 f'{lit(w.generation)}{{{{ end }}}}')
    parts.append("{{ end }}")
    return "".join(parts)


def faithful_wrappers(tokenizer) -> tuple[Optional[Wrappers], str]:
    """(wrappers, "") when the measured template replays every test conversation exactly,
    else (None, why)."""
    if not getattr(tokenizer, "chat_template", None):
        return None, "the tokenizer has no chat template"
    try:
        w = measure(tokenizer)
        go_template(w)
        for messages, gen in conversations():
            if replay(w, messages, gen) != _render(tokenizer, messages, gen):
                return None, "the chat template does not wrap each message on its own"
    except Exception as exc:  # a Jinja template may raise anything (raise_exception, KeyError)
        return None, f"the chat template cannot be measured ({type(exc).__name__}: {exc})"
    return w, ""


def stop_tokens(tokenizer, w: Optional[Wrappers], eos_ids: list) -> list[str]:
    """The EOS token(s) and the special tokens that end an assistant turn."""
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids if i is not None]
    if w is not None:
        specials = [t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab())
                    if t and t in w.suffix["assistant"]]
        stops += specials
    stops.append(tokenizer.eos_token)
    return list(dict.fromkeys(s for s in stops if s))


def write_modelfile(out_dir: Path, gguf_name: str, tokenizer, eos_ids: list) -> tuple[Path, str]:
    """Write out_dir/Modelfile; return (its path, a note for the log: empty, or why the
    TEMPLATE was left out)."""
    w, why = faithful_wrappers(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    if w is not None:
        lines += [f'TEMPLATE """{go_template(w)}"""', ""]
    else:
        lines += [f"# No TEMPLATE: {why}; Ollama then falls back to the template it knows for",
                  "# the chat_template stored in the GGUF, or to the raw prompt.", ""]
    for stop in stop_tokens(tokenizer, w, eos_ids):
        lines.append(f'PARAMETER stop "{stop}"')
    path = out_dir / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, why
