"""The engine facade: a loaded model plus early-exit defaults; turns requests into Generations.

Callers (CLI, server, benchmarks) use only this class and the types in ``octomil.engine.types``.
It is not thread-safe: iterate every Generation on one engine thread.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
from typing import Any

import mlx.core as mx

from octomil import blas
from octomil.config import EarlyExitSettings
from octomil.engine.constraint import GrammarCompiler
from octomil.engine.draft_model import check_same_vocabulary
from octomil.engine.errors import EngineInputError, PromptTooLongError
from octomil.engine.exit_adapters import ExitPolicyBundle, ExitPolicyChoice, resolve_exit_policy
from octomil.engine.exit_policy import ExitPolicy
from octomil.engine.generation import Generation
from octomil.engine.layer_loop import PREFILL_STEP, FullDepthLoop, LayerLoop
from octomil.engine.prompt_tokens import PromptTokenizer
from octomil.engine.speculation import SpeculativeSettings
from octomil.engine.token_classes import never_exit_mask
from octomil.engine.tool_calls import Function, fallback_messages, template_supports_tools
from octomil.engine.tool_syntax import ToolSyntax, syntax_for_template
from octomil.engine.types import EffectiveEarlyExit, GenerationRequest
from octomil.kernels import decode
from octomil.models.layout import COMPACT
from octomil.models.loader import LoadedModel
from octomil.models.loader import load as load_model
from octomil.policy_file import NeverExit
from octomil.quant import kernel as qmm

log = logging.getLogger(__name__)
NO_EARLY_EXIT = EarlyExitSettings()  # frozen: safe as a shared default

CHAT_ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        early_exit: EarlyExitSettings = NO_EARLY_EXIT,
        exit_layers: tuple[int, ...] | None = None,
        exit_policy: ExitPolicyChoice | None = None,
    ) -> None:
        """``exit_policy`` None (in-memory engines, tests): exit on the raw shared head, as
        ``--exit-policy lens``; :meth:`load` resolves the calibrated policy for the model."""
        self.loaded = loaded
        self.model_id = loaded.name
        self.total_layers = loaded.num_layers
        self.context_length = loaded.context_length
        self.tokenizer = loaded.tokenizer
        self.exit_layers = exit_layers
        self.default_early_exit = early_exit
        self.early_exit_supported = loaded.anatomy is not None
        self.exit_choice = exit_policy or ExitPolicyChoice(
            None, True, "raw shared head (in-memory engine)"
        )
        if early_exit.enabled and not self.early_exit_supported:
            log.warning(
                "early exit is not supported for model family %r; serving at full depth",
                loaded.family,
            )
        # Prompt tokens fed per prefill chunk; a server sets its per-step budget here. A prompt is
        # cut the same way whether it is served alone or batched, so its answer is the same.
        self.prefill_chunk = PREFILL_STEP
        # Speculative decoding for requests that do not choose (``--speculative``), and the
        # draft models ``model:NAME`` modes may use (``add_draft_model``).
        self.default_speculative = SpeculativeSettings()
        self.draft_models: dict[str, LoadedModel] = {}
        # Rows of the embedding: tokenizer.vocab_size leaves out added special tokens.
        self._vocab_size = int(getattr(loaded.model.args, "vocab_size", 0) or len(self.tokenizer))
        self.never_exit: mx.array | None = None  # set_never_exit
        self.shadow_rate = 0.0  # share of early exits compared with full depth (engine.shadow)

    def set_never_exit(self, classes: NeverExit) -> None:
        """Tokens of ``classes`` are never emitted from an early exit (``token_classes``)."""
        self.never_exit = never_exit_mask(self.tokenizer, self._vocab_size, classes)

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        dtype: str = "auto",
        early_exit: EarlyExitSettings = NO_EARLY_EXIT,
        exit_layers: tuple[int, ...] | None = None,
        exit_policy: str | None = None,
    ) -> Engine:
        """``exit_policy``: a policy directory, "lens" (raw shared head), "none", or None to use
        ``$OCTOMIL_EXIT_POLICY`` or the calibrated policy found for the model (user cache, then
        package). A policy made for other weights raises ``ExitPolicyError`` (a ValueError)."""

        def calibrated_at(name: str, source: str, layers: int, hidden: int, fmt: str) -> bool:
            # Exits react to a format's rounding: auto serves q8/q4 only under a policy made there.
            try:
                found = resolve_exit_policy(name, source, layers, hidden, exit_policy).bundle
            except ValueError:  # an unusable policy: reported by the resolution below
                return False
            return found is not None and found.manifest.weights_format == fmt

        loaded = load_model(model, dtype, calibrated_at)
        choice = ExitPolicyChoice(None, False, "early exit not supported for this model family")
        if loaded.anatomy is not None:
            choice = resolve_exit_policy(
                loaded.name,
                loaded.source,
                loaded.num_layers,
                int(loaded.model.args.hidden_size),
                exit_policy,
            )
            served = loaded.layout.layout if loaded.layout.layout in COMPACT else "float32"
            made_at = choice.bundle.manifest.weights_format if choice.bundle else served
            if made_at != served:
                log.warning(
                    "[early-exit] the exit policy was calibrated at %s weights, these are served "
                    "at %s: exits may differ from its measured quality; run `octomil calibrate` "
                    "with --dtype %s",
                    made_at,
                    served,
                    loaded.layout.layout,
                )
            if choice.bundle is None and not choice.raw_head and early_exit.enabled:
                log.warning("[early-exit] %s", choice.status)
            else:
                log.info("[early-exit] %s", choice.status)
        return cls(loaded, early_exit, exit_layers, choice)

    @property
    def exit_bundle(self) -> ExitPolicyBundle | None:
        return self.exit_choice.bundle

    @property
    def selection(self) -> str:
        """What serves requests, for the ``[engine] Selected: ...`` startup line."""
        device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        how = "fastest" if self.loaded.layout.measured else "requested"
        weights = self.loaded.layout.layout
        weights = self.loaded.native_layout if weights == "native" else weights
        if self.loaded.layout.transposed:
            weights += " (in, out)"
        if weights in ("q8", "q4"):
            weights += f" ({qmm.isa()} kernel)"
        return (
            f"mlx ({how}) on {device} ({platform.machine()}): {weights} weights, "
            f"{blas.describe()}, {decode.status()}"
        )

    @property
    def effective_early_exit(self) -> EffectiveEarlyExit:
        """What the default settings do here: where checks are placed, or why none is."""
        return self.effective(self.default_early_exit)

    def effective(self, settings: EarlyExitSettings) -> EffectiveEarlyExit:
        """What ``settings`` do here (a server's default changed at run time, say)."""
        policy = self.policy_for(settings) if settings.enabled else None
        layers = tuple(policy.exit_layers) if policy is not None else ()
        if not settings.enabled or layers:
            return EffectiveEarlyExit(settings, layers)
        if not self.early_exit_supported:
            why = f"not supported for model family {self.loaded.family!r}"
        elif self.exit_choice.bundle is not None:
            why = "policy: no check pays on this machine"
        elif self.exit_choice.raw_head:
            why = "no depth can repay a check of the shared head"
        elif self.exit_choice.status.startswith("none"):
            why = "--exit-policy none"
        else:
            why = f"no calibrated exit policy for this model (`octomil calibrate {self.model_id}`)"
        return EffectiveEarlyExit(settings, (), why)

    def policy_for(
        self, settings: EarlyExitSettings | None, method: str | None = None
    ) -> ExitPolicy | None:
        """The exit policy for a request; ``method`` (entropy|probe|lowrank) picks another
        calibrated decision method than the policy's choice (for ``octomil eval``)."""
        if not self.early_exit_supported:
            return None
        settings = settings if settings is not None else self.default_early_exit
        bundle = self.exit_choice.bundle
        policy: ExitPolicy | None
        if bundle is not None:
            assert self.loaded.anatomy is not None
            policy = bundle.policy(
                settings, self.loaded.anatomy, method=method, layers=self.exit_layers
            )
        elif not self.exit_choice.raw_head:
            return None  # no calibrated policy: full depth
        else:
            policy = ExitPolicy.from_settings(
                settings,
                self.total_layers,
                self.exit_layers,
                self.loaded.anatomy.head_cost_in_layers(),
            )
        if policy is not None and self.never_exit is not None:
            policy = dataclasses.replace(policy, never_exit=self.never_exit)
        if policy is not None and settings.observe:
            policy = dataclasses.replace(policy, observe=True)
        return policy

    def disagreement_budget(self, settings: EarlyExitSettings) -> float | None:
        """The calibrated policy's budget of disagreement with full depth for ``settings``."""
        bundle = self.exit_choice.bundle
        if bundle is None or not settings.enabled or not bundle.manifest.presets:
            return None
        return bundle.placement(settings).budget

    def default_kv_budget(self, memory_fraction: float = 0.4) -> int:
        """KV cache positions that fit ``memory_fraction`` of this machine's memory."""
        args = self.loaded.model.args
        heads = int(getattr(args, "num_key_value_heads", None) or args.num_attention_heads)
        head_dim = int(
            getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        )
        per_token = 2 * self.total_layers * heads * head_dim * 4  # keys and values, float32
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return max(self.context_length, int(memory * memory_fraction / per_token))

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Characters beyond which a text cannot fit the context even at the longest token (a
        cheap bound checked before tokenizing; 2x margin for normalizers that drop characters)."""
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        return 2 * self.context_length * max(longest, 1)

    @functools.cached_property
    def _prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer(self.tokenizer)

    @functools.cached_property
    def tool_syntax(self) -> ToolSyntax:
        """How this model writes tool calls: its chat template's family (``engine.tool_syntax``)."""
        tokenizer = self.tokenizer
        return syntax_for_template(getattr(tokenizer, "chat_template", None), tokenizer.get_vocab())

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """Compiles requests' grammars against this tokenizer (structured outputs)."""
        return GrammarCompiler(self.tokenizer, self._vocab_size, self.loaded.eos_token_ids)

    def encode(self, text: str) -> list[int]:
        """A completions prompt, tokenized as text: control strings such as ``<|im_start|>`` in it
        are not parsed as special tokens (as in OpenAI's API; send token ids for those)."""
        if not isinstance(text, str):
            raise EngineInputError("prompt must be a string", param="prompt")
        return self._prompt_tokenizer.encode_text(text)

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[Function] | None = None
    ) -> list[int]:
        """Apply the model's chat template (with the assistant generation prompt) and tokenize.

        Message content is text: only the template's own markers become control tokens, so
        content cannot forge a turn (:mod:`octomil.engine.prompt_tokens`). Tools, assistant
        ``tool_calls`` (arguments as objects) and ``tool`` messages go through the template when
        it supports tools, else as text (:mod:`octomil.engine.tool_calls`)."""
        uses_tools = bool(tools) or any(
            m.get("tool_calls") or m.get("role") == "tool" for m in messages
        )
        native = template_supports_tools(getattr(self.tokenizer, "chat_template", None))
        if uses_tools and not native:
            messages = fallback_messages(messages, tools or [])
        if not messages:
            raise EngineInputError("messages must contain at least one message", param="messages")
        for i, m in enumerate(messages):
            if m.get("role") not in CHAT_ROLES:
                raise EngineInputError(
                    f"messages[{i}].role {m.get('role')!r} is not one of {sorted(CHAT_ROLES)}",
                    param=f"messages.{i}.role",
                )
            if not isinstance(m.get("content"), str):
                raise EngineInputError(
                    f"messages[{i}].content must be a string", param=f"messages.{i}.content"
                )
        if uses_tools and native:
            return self._prompt_tokenizer.encode_chat(messages, [f.as_tool() for f in tools or []])
        return self._prompt_tokenizer.encode_chat(messages)

    def generate(self, request: GenerationRequest) -> Generation:
        """Validate the request and return its (not yet started) Generation."""
        prompt = list(request.prompt_tokens)
        params = request.sampling
        if not prompt:
            raise EngineInputError("the prompt is empty", param="prompt")
        if params.max_tokens < 1:
            raise EngineInputError("max_tokens must be at least 1", param="max_tokens")
        if len(prompt) + params.max_tokens > self.context_length:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.context_length} tokens. However, "
                f"you requested {len(prompt) + params.max_tokens} tokens ({len(prompt)} in the "
                f"prompt, {params.max_tokens} in the completion). Please reduce the prompt or "
                "max_tokens."
            )
        bad = [t for t in prompt if not 0 <= t < self._vocab_size]
        if bad:
            raise EngineInputError(f"prompt token ids out of range: {bad[:5]}", param="prompt")
        speculative = request.speculative or self.default_speculative
        draft = None
        if speculative.draft_model is not None:
            draft = self.draft_models.get(speculative.draft_model)
            if draft is None:
                raise EngineInputError(
                    f"draft model {speculative.draft_model!r} is not loaded on this server "
                    f"(loaded: {sorted(self.draft_models) or 'none'}; start it with "
                    "--speculative model:NAME)",
                    param="speculative.mode",
                )
        bad = [t for t, _ in params.logit_bias if not 0 <= t < self._vocab_size]
        if bad:
            raise EngineInputError(
                f"logit_bias token ids out of range [0, {self._vocab_size}): {bad[:5]}",
                param="logit_bias",
            )
        constraint = self.grammars.compile(params.grammar) if params.grammar is not None else None
        model = self.loaded.model
        anatomy = self.loaded.anatomy
        loop: LayerLoop | FullDepthLoop
        if anatomy is not None:
            loop = LayerLoop(anatomy, model)
            loop.shadow.rate = self.shadow_rate
        else:
            loop = FullDepthLoop(model)
        return Generation(
            loop,
            prompt,
            params,
            self.policy_for(request.early_exit),
            self.tokenizer,
            self.loaded.eos_token_ids,
            self._vocab_size,
            self.prefill_chunk,
            speculative=speculative,
            draft_model=draft,
            constraint=constraint,
        )

    def add_draft_model(self, name: str, loaded: LoadedModel) -> None:
        """Let ``model:NAME`` requests draft with ``loaded``; raises DraftModelError (a
        ValueError) when its vocabulary differs from the served model's."""
        check_same_vocabulary(name, self.loaded, loaded)
        self.draft_models[name] = loaded

    def load_draft_model(self, name: str, dtype: str = "auto") -> None:
        self.add_draft_model(name, load_model(name, dtype))
