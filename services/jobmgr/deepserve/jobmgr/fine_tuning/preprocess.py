"""The preprocess stage: validate the chat files, apply the chat template, tokenize, split.

Each example trains on its last assistant turn: the prompt (everything before it, rendered
with the model's chat template and a generation prompt) is masked out of the labels.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from deepserve.errors import InvalidArgument
from deepserve.files.validation import check_chat_messages, iter_jsonl
from deepserve.tokenizer import Tokenizer

IGNORE_INDEX = -100
MAX_SEQ_LEN = 1024


@dataclass
class TokenizedDataset:
    """Token ids and labels (prompt masked with -100) of the train and validation examples."""

    train: list[dict[str, list[int]]] = field(default_factory=list)
    valid: list[dict[str, list[int]]] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps({"train": self.train, "valid": self.valid}).encode()

    @property
    def train_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.train)


def encode_example(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], where: str
) -> dict[str, list[int]]:
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    prompt = tokenizer.encode_chat(messages[:last], add_generation_prompt=True)
    full = tokenizer.encode_chat(messages[: last + 1], add_generation_prompt=False)
    if full[: len(prompt)] != prompt or len(full) <= len(prompt):
        raise InvalidArgument(
            f"{where}: the chat template does not render the answer after its prompt",
            field="training_file",
        )
    if len(full) > MAX_SEQ_LEN:
        raise InvalidArgument(
            f"{where}: {len(full)} tokens exceeds the limit of {MAX_SEQ_LEN}",
            field="training_file",
        )
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
    return {"input_ids": full, "labels": labels}


def _examples(
    data: bytes, tokenizer: Tokenizer, file_field: str, file_id: str
) -> list[dict[str, list[int]]]:
    examples = []
    try:
        for number, line in iter_jsonl(data):
            where = f"{file_id} line {number}"
            messages = line.get("messages")
            if messages is None:
                raise InvalidArgument(f"{where}: missing 'messages'", field=file_field)
            check_chat_messages(messages, where)
            if not any(m.get("role") == "assistant" for m in messages):
                raise InvalidArgument(f"{where}: no assistant message", field=file_field)
            examples.append(encode_example(tokenizer, messages, where))
    except InvalidArgument as exc:
        raise InvalidArgument(exc.message, field=file_field) from None
    if not examples:
        raise InvalidArgument(f"{file_id} holds no examples", field=file_field)
    return examples


def build_dataset(
    tokenizer: Tokenizer,
    training: tuple[str, bytes],
    validation: tuple[str, bytes] | None,
    *,
    split: float,
    seed: int,
) -> TokenizedDataset:
    """Tokenizes both files; without a validation file, holds out `split` of the training set
    (when it has at least 10 examples; a smaller set is validated on itself)."""
    train = _examples(training[1], tokenizer, "training_file", training[0])
    if validation is not None:
        valid = _examples(validation[1], tokenizer, "validation_file", validation[0])
        return TokenizedDataset(train, valid)
    if len(train) >= 10 and split > 0:
        shuffled = train[:]
        random.Random(seed).shuffle(shuffled)
        held = max(1, int(len(shuffled) * split))
        return TokenizedDataset(shuffled[held:], shuffled[:held])
    return TokenizedDataset(train, list(train))
