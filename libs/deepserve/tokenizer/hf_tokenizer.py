"""A model's tokenizer read from its Hugging Face files, with the `tokenizers` library only.

The gateway tokenizes and renders chat prompts, the engine detokenizes; both load the same model
directory, so this module avoids torch and transformers. Loading follows transformers'
(v5) TokenizersBackend closely enough that ids and prompts match `AutoTokenizer` exactly; in
particular tokenizer.json's post-processor alone decides whether encode adds BOS/EOS, and
tokenizer_config.json's add_bos_token/add_eos_token are ignored, as transformers v5 does when a
tokenizer.json exists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from deepserve.errors import FailedPrecondition, NotFound
from deepserve.tokenizer.chat_template import DEFAULT_TEMPLATE_NAME, ChatTemplate

# The named special tokens transformers hands to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def _added_token(value: Any) -> AddedToken | None:
    """A special token given as a string or as a serialized AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", False)),
            special=True,
        )
    raise FailedPrecondition(f"special token entry {value!r} is neither a string nor a token dict")


def _chat_templates(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named templates; files saved by newer transformers replace the config's entry, as there."""
    templates: dict[str, str] = {}
    from_files: dict[str, str] = {}
    template_file = model_dir / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        from_files[DEFAULT_TEMPLATE_NAME] = template_file.read_text(encoding="utf-8")
    template_dir = model_dir / CHAT_TEMPLATE_DIR
    if template_dir.is_dir():
        for path in sorted(template_dir.glob("*.jinja")):
            from_files[path.stem] = path.read_text(encoding="utf-8")
    if from_files:
        return from_files
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates[DEFAULT_TEMPLATE_NAME] = raw
    elif isinstance(raw, list):
        for entry in raw:
            if isinstance(entry, Mapping) and "name" in entry and "template" in entry:
                templates[str(entry["name"])] = str(entry["template"])
    return templates


# generation_config.json fields that are sampling defaults for requests that leave them out
# (vLLM's --generation-config behaviour); do_sample and the rest are not API knobs.
GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(config: Mapping[str, Any]) -> dict[str, float]:
    """The sampling defaults a model's generation_config.json sets."""
    return {
        name: float(config[name])
        for name in GENERATION_DEFAULT_FIELDS
        if isinstance(config.get(name), int | float) and not isinstance(config.get(name), bool)
    }


def _ids_from(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Text <-> token ids and chat-prompt rendering for one model (no torch, no transformers)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        generation_defaults: Mapping[str, float] | None = None,
    ) -> None:
        self._backend = backend
        # The engine decides how long a prompt may be; never cut or pad silently here.
        self._backend.no_truncation()
        self._backend.no_padding()
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_template = ChatTemplate(chat_templates or {})
        # Sampling defaults from generation_config.json (temperature, top_p, ...).
        self.generation_defaults: dict[str, float] = dict(generation_defaults or {})
        # The config's eos first, then generation_config's (chat models often list several).
        eos_candidates = [self.eos_token_id, *extra_eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(t for t in eos_candidates if t is not None)
        )
        vocab = backend.get_vocab(with_added_tokens=True)
        # Highest id + 1 over the base vocabulary and added tokens (HF's len(tokenizer)), which
        # is what bounds ids; HF's own `vocab_size` attribute leaves added tokens out.
        self.vocab_size: int = max(vocab.values(), default=-1) + 1
        # Added tokens flagged special: exactly what decode(skip_special_tokens=True) drops.
        self.special_token_ids: frozenset[int] = frozenset(
            token_id
            for token_id, token in backend.get_added_tokens_decoder().items()
            if token.special
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json plus tokenizer_config.json (and friends) from a model directory."""
        model_dir = Path(path)
        tokenizer_file = model_dir / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise NotFound(f"no {TOKENIZER_FILE} in {model_dir}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(model_dir / TOKENIZER_CONFIG_FILE)
        legacy_map = _read_json(model_dir / SPECIAL_TOKENS_MAP_FILE)

        named: dict[str, AddedToken] = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = _added_token(config.get(name, legacy_map.get(name)))
            if token is not None:
                named[name] = token
        extra_values = (
            config.get("extra_special_tokens")
            or config.get("additional_special_tokens")
            or legacy_map.get("additional_special_tokens")
            or []
        )
        if isinstance(extra_values, Mapping):
            extra_values = list(extra_values.values())
        extras = [t for t in (_added_token(v) for v in extra_values) if t is not None]

        # Like transformers, make sure every declared special token is an added special token,
        # so it is matched whole in text instead of being split by the model.
        known = {token.content for token in backend.get_added_tokens_decoder().values()}
        missing = [t for t in [*named.values(), *extras] if t.content not in known]
        if missing:
            backend.add_special_tokens(list({t.content: t for t in missing}.values()))

        generation_config = _read_json(model_dir / GENERATION_CONFIG_FILE)
        return cls(
            backend,
            special_tokens={name: token.content for name, token in named.items()},
            chat_templates=_chat_templates(model_dir, config),
            extra_eos_token_ids=_ids_from(generation_config.get("eos_token_id")),
            generation_defaults=generation_defaults(generation_config),
        )

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def bos_token_id(self) -> int | None:
        return self._id_or_none(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self._id_or_none(self.special_tokens.get("eos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self._id_or_none(self.special_tokens.get("pad_token"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str | None]:
        return [self._backend.id_to_token(token_id) for token_id in token_ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render messages into the prompt text; special tokens appear as text in it."""
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self.special_tokens,
            **template_kwargs,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Prompt token ids for a chat; the template already wrote BOS if the model wants one."""
        prompt = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs
        )
        return self.encode(prompt, add_special_tokens=False)
