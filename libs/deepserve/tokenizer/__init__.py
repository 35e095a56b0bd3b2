"""Tokenization and chat-template rendering shared by the gateway and the engine (no torch)."""

from deepserve.tokenizer.chat_template import ChatTemplate, normalize_messages
from deepserve.tokenizer.hf_tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer

__all__ = ["SPECIAL_TOKEN_NAMES", "ChatTemplate", "Tokenizer", "normalize_messages"]
