"""Chat templates: the Jinja2 template a model ships with (``tokenizer.chat_template`` in a GGUF
file, ``chat_template`` in an HF tokenizer config) rendered in a sandbox, as transformers'
``apply_chat_template`` does: ``messages`` = [{"role": "system" | "user" | "assistant", "content": str}].
"""
from __future__ import annotations

import json
from pathlib import Path
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

    @classmethod
    def from_hf(cls, folder: str | Path) -> "ChatTemplate":
        """The template of an HF model folder: ``chat_template.jinja``, else ``chat_template`` in
        ``chat_template.json`` or ``processor_config.json`` (a multimodal processor's), else in
        ``tokenizer_config.json`` (a string, or named templates: the ``default`` one), with its bos / eos tokens."""
        from vlkit.data.tokenizers import hf_tokenizer_config

        folder = Path(folder)
        conf = hf_tokenizer_config(folder)
        template = conf.get("chat_template")
        for name in ("processor_config.json", "chat_template.json"):
            if (folder / name).is_file():
                template = json.loads((folder / name).read_text()).get("chat_template", template)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise ValueError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json's "
                             "chat_template); a base model needs one written there")
        return cls(template, conf.get("bos_token") or "", conf.get("eos_token") or "")
