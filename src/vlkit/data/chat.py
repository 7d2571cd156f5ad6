"""Chat templates: the Jinja2 template a model ships with (``tokenizer.chat_template`` in a GGUF
file, ``chat_template`` in an HF tokenizer config) rendered in a sandbox, as transformers'
``apply_chat_template`` does: ``messages`` = [{"role": "system" | "user" | "assistant", "content": str}].
"""
from __future__ import annotations

from typing import Sequence


class ChatTemplate:
    """render(messages, add_generation_prompt=True) -> the prompt text for the model."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(template)
        self.source, self.bos_token, self.eos_token = template, bos_token, eos_token

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"a chat message needs 'role' and 'content', got {m!r}")
        return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    @classmethod
    def from_gguf(cls, reader) -> "ChatTemplate":
        fields = reader.fields
        if "tokenizer.chat_template" not in fields:
            raise ValueError("this GGUF file has no tokenizer.chat_template")
        tokens = fields["tokenizer.ggml.tokens"].contents()

        def token(key: str) -> str:
            return tokens[fields[key].contents()] if key in fields else ""

        return cls(fields["tokenizer.chat_template"].contents(), token("tokenizer.ggml.bos_token_id"),
                   token("tokenizer.ggml.eos_token_id"))
