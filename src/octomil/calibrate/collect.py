"""Self-distillation data: the model's own continuations, and its hidden states along them.

1. :func:`generate` continues every calibration prompt (chat template applied) with mlx-lm's
   batched generator: greedy for every prompt, plus sampled (T=0.8) continuations while the token
   budget lasts, so the data covers both the text the server will produce and nearby text.
2. :func:`collect_states` runs each finished sequence through the layer stack in one batched,
   causal prefill and keeps, at every position the decoder would feed (the completion's tokens),
   the hidden state after each candidate depth and after the last layer. The full-depth
   distribution at a position is ``anatomy.logits(final)``: recomputed per training batch, never
   stored (49k floats per token).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_attention_mask

from octomil.models.anatomy import Anatomy

SAMPLE_TEMPERATURE = 0.8
SAMPLED_ROUND = 16
# Tokens (batch rows x padded length) per collection prefill: bounds memory, keeps matmuls large.
COLLECT_TOKENS_PER_BATCH = 2048

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Sequence_:
    prompt_index: int
    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    sampled: bool  # False: greedy


@dataclass
class States:
    """Hidden states at every fed completion position, grouped by sequence.

    ``by_depth[d]`` is (T, D) float32: the state after ``d`` layers; ``final`` is (T, D) after
    the last layer; ``prompt_index[t]`` says which prompt position ``t`` came from."""

    by_depth: dict[int, np.ndarray]
    final: np.ndarray
    prompt_index: np.ndarray
    sampled: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.final.shape[0])

    def subset(self, mask: np.ndarray) -> States:
        return States(
            {d: v[mask] for d, v in self.by_depth.items()},
            self.final[mask],
            self.prompt_index[mask],
            self.sampled[mask],
        )


def generate(
    model,
    prompts: Sequence[list[int]],
    eos_token_ids: frozenset[int],
    token_budget: int,
    max_new_tokens: int,
    seed: int,
    progress: Progress | None = None,
) -> list[Sequence_]:
    """Greedy continuations of every prompt, then sampled ones while ``token_budget`` lasts."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    greedy = make_sampler(temp=0.0)
    sampled = make_sampler(temp=SAMPLE_TEMPERATURE)
    jobs = [(i, False) for i in range(len(prompts))]
    # One sampled continuation per prompt, in a seeded order; the budget cuts the list below.
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    jobs += [(i, True) for i in order]

    out: list[Sequence_] = []
    total = 0
    # Every prompt's greedy continuation in one round, then sampled ones in rounds of
    # SAMPLED_ROUND until the budget is reached (so it overshoots by at most one round).
    rounds = [jobs[: len(prompts)]]
    rounds += [jobs[i : i + SAMPLED_ROUND] for i in range(len(prompts), len(jobs), SAMPLED_ROUND)]
    for batch in rounds:
        if total >= token_budget:
            break
        gen = BatchGenerator(
            model,
            stop_tokens=[[t] for t in sorted(eos_token_ids)],
            completion_batch_size=32,
            prefill_batch_size=16,
        )
        uids = gen.insert(
            [list(prompts[i]) for i, _ in batch],
            [max_new_tokens] * len(batch),
            samplers=[sampled if s else greedy for _, s in batch],
        )
        tokens: dict[int, list[int]] = {u: [] for u in uids}
        try:
            while responses := gen.next_generated():
                for r in responses:
                    tokens[r.uid].append(int(r.token))
                    if progress is not None:
                        progress(1)
        finally:
            gen.close()
        for uid, (i, s) in zip(uids, batch, strict=False):
            out.append(Sequence_(i, tuple(prompts[i]), tuple(tokens[uid]), s))
            total += len(tokens[uid])
    return out


def collect_states(
    anatomy: Anatomy,
    sequences: Sequence[Sequence_],
    depths: Sequence[int],
    progress: Progress | None = None,
) -> States:
    """Hidden states after each of ``depths`` and after the last layer, at the positions the
    decoder feeds: the completion tokens whose successor is known (prompt + completion[:-1])."""
    n_layers = anatomy.num_layers
    want = sorted(set(depths))
    by_depth: dict[int, list[np.ndarray]] = {d: [] for d in want}
    finals: list[np.ndarray] = []
    prompt_index: list[np.ndarray] = []
    sampled: list[np.ndarray] = []
    todo = sorted(
        (s for s in sequences if len(s.completion) >= 2),
        key=lambda s: len(s.prompt) + len(s.completion),
    )
    i = 0
    while i < len(todo):
        longest = len(todo[i].prompt) + len(todo[i].completion)
        batch = [todo[i]]
        i += 1
        while i < len(todo):
            longest = len(todo[i].prompt) + len(todo[i].completion)
            if longest * (len(batch) + 1) > COLLECT_TOKENS_PER_BATCH:
                break
            batch.append(todo[i])
            i += 1
        lengths = [len(s.prompt) + len(s.completion) for s in batch]
        width = max(lengths)
        # Right padding: a causal mask keeps real positions blind to the padding after them.
        ids = mx.array(
            [
                list(s.prompt) + list(s.completion) + [0] * (width - n)
                for s, n in zip(batch, lengths, strict=False)
            ]
        )
        h = anatomy.embed(ids)
        kept: dict[int, mx.array] = {}
        for layer in range(n_layers):
            window = anatomy.sliding_window if anatomy.is_sliding(layer) else None
            mask = create_attention_mask(
                h, None, window_size=window, return_array=anatomy.mask_as_array
            )
            h = anatomy.layers[layer](h, mask, None)
            if layer + 1 in by_depth:
                kept[layer + 1] = h
        kept[n_layers] = h
        mx.eval(kept)
        arrays = {d: np.asarray(v.astype(mx.float32)) for d, v in kept.items()}
        for row, (s, n) in enumerate(zip(batch, lengths, strict=False)):
            # Decode feeds completion[0..-2] at positions len(prompt)..n-2 (the last token's
            # successor is unknown); each such position predicts the next completion token.
            lo, hi = len(s.prompt), n - 1
            for d in want:
                by_depth[d].append(arrays[d][row, lo:hi])
            finals.append(arrays[n_layers][row, lo:hi])
            prompt_index.append(np.full(hi - lo, s.prompt_index, dtype=np.int32))
            sampled.append(np.full(hi - lo, s.sampled, dtype=bool))
        if progress is not None:
            progress(len(batch))
    return States(
        {d: np.concatenate(v) for d, v in by_depth.items()},
        np.concatenate(finals),
        np.concatenate(prompt_index),
        np.concatenate(sampled),
    )
