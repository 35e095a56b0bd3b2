"""The tokenizer of each served model, loaded once per model from its model directory."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from deepserve.errors import DeepServeError, Unavailable
from deepserve.models.catalog import default_cache_dir, resolve_model
from deepserve.tokenizer import Tokenizer


class TokenizerRegistry:
    """Model name (as instances register it: catalog name or directory) -> its Tokenizer."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._cache_dir = cache_dir or default_cache_dir()
        self._loaded: dict[str, Tokenizer] = {}
        self._loading: dict[str, asyncio.Future[Tokenizer]] = {}
        self._preloads: set[asyncio.Future[None]] = set()

    def put(self, model: str, tokenizer: Tokenizer) -> None:
        self._loaded[model] = tokenizer

    async def get(self, model: str) -> Tokenizer:
        found = self._loaded.get(model)
        if found is not None:
            return found
        # Concurrent first requests share one load instead of each reading the files.
        pending = self._loading.get(model)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._load, model))
            self._loading[model] = pending
            pending.add_done_callback(lambda _f: self._loading.pop(model, None))
        tokenizer = await asyncio.shield(pending)
        self._loaded[model] = tokenizer
        return tokenizer

    def preload(self, model: str) -> None:
        """Starts loading in the background, so the model's first request finds it ready."""
        if model in self._loaded or model in self._loading:
            return

        async def load() -> None:
            with contextlib.suppress(DeepServeError):
                await self.get(model)

        task = asyncio.ensure_future(load())
        self._preloads.add(task)
        task.add_done_callback(self._preloads.discard)

    def _load(self, model: str) -> Tokenizer:
        try:
            return Tokenizer.from_model_dir(resolve_model(model, self._cache_dir))
        except DeepServeError as exc:
            raise Unavailable(
                f"the gateway cannot load the tokenizer of model {model!r}: {exc.message}"
            ) from exc
