"""A deterministic stand-in for the Engine, for unit tests of the engine client's scheduling only.

End-to-end API tests use the real Engine; this double exists to pin queueing, cancellation and
429 behaviour exactly and fast (no model, no MLX).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from octomil.config import EarlyExitSettings
from octomil.engine.errors import EngineInputError
from octomil.engine.types import GenerationRequest, GenerationStats, TokenEvent


class FakeGeneration:
    def __init__(self, request: GenerationRequest, total_layers: int, delay: float) -> None:
        self.request = request
        self.stats = GenerationStats(
            total_layers=total_layers, prompt_tokens=len(request.prompt_tokens)
        )
        self._cancelled = threading.Event()
        self._delay = delay
        self.thread_names: set[str] = set()
        self.finished = False

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[TokenEvent]:
        n = self.request.sampling.max_tokens
        for i in range(n):
            self.thread_names.add(threading.current_thread().name)
            if self._cancelled.is_set():
                self.stats.finish_reason = "cancelled"
                return
            time.sleep(self._delay)
            layers = 10 + (i % 3)
            early = layers < 30
            self.stats.completion_tokens += 1
            self.stats.layers_used.append(layers)
            self.stats.entropies.append(0.1)
            self.stats.early_exit_tokens += int(early)
            finish = "length" if i == n - 1 else None
            yield TokenEvent(
                token_id=i,
                text=f" t{i}",
                layers_used=layers,
                entropy=0.1,
                exited_early=early,
                finish_reason=finish,
            )
        self.stats.finish_reason = "length"
        self.finished = True


class FakeEngine:
    model_id = "fake"
    total_layers = 30
    context_length = 64
    default_early_exit = EarlyExitSettings()
    selection = "fake"

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.generations: list[FakeGeneration] = []

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split()) or 1))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages))

    def generate(self, request: GenerationRequest) -> FakeGeneration:
        if request.sampling.max_tokens > 1000:
            raise EngineInputError("too many tokens", param="max_tokens")
        gen = FakeGeneration(request, self.total_layers, self.delay)
        self.generations.append(gen)
        return gen
