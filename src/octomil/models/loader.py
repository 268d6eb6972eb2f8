"""Load a model by alias, path or repo id: weights in the fastest layout, tokenizer, anatomy."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn

from octomil.models import registry
from octomil.models.anatomy import Anatomy, anatomy_of, model_family
from octomil.models.errors import ModelNotAvailableError
from octomil.models.fast_modules import install_fast_modules
from octomil.models.layout import (
    LayoutChoice,
    apply_layout,
    choose_layout,
    convert_precision,
    native_description,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str  # served model id
    model: nn.Module
    tokenizer: Any  # transformers PreTrainedTokenizer(Fast)
    family: str
    anatomy: Anatomy | None  # None: early exit not supported for this family
    layout: LayoutChoice
    native_layout: str
    context_length: int
    eos_token_ids: frozenset[int]
    source: str  # file or directory the weights came from

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def describe_layout(self) -> str:
        return self.layout.describe(self.native_layout)


def _load_gguf(path: Path) -> tuple[nn.Module, Any, dict]:
    from octomil.models.gguf import load_gguf
    from octomil.models.gguf_tokenizer import build_tokenizer

    model, config, meta = load_gguf(path)
    return model, build_tokenizer(meta), config


def _load_mlx_dir(path: Path) -> tuple[nn.Module, Any, dict]:
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(path)
    wrapper = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, wrapper._tokenizer, config


def _read(source: Path) -> tuple[nn.Module, Any, dict]:
    """``(model, tokenizer, config)`` from a .gguf file or an mlx-lm model directory."""
    if source.is_file() and source.suffix == ".gguf":
        return _load_gguf(source)
    if source.is_dir():
        return _load_mlx_dir(source)
    raise ModelNotAvailableError(f"{source} is neither a .gguf file nor an mlx-lm model directory")


def _eos_ids(tokenizer: Any, config: dict) -> frozenset[int]:
    ids = set()
    eos = config.get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


# (model name, source, layers, hidden size, compact format) -> may ``auto`` serve that format
CompactCheck = Callable[[str, str, int, int, str], bool]


def load(
    name: str | None = None, dtype: str = "auto", compact_ok: CompactCheck | None = None
) -> LoadedModel:
    """Resolve ``name`` and load it; raises :class:`ModelNotAvailableError` with one clear line.

    ``compact_ok`` decides whether ``--dtype auto`` may serve a 4/8-bit checkpoint at its own
    format (see :func:`octomil.models.layout.choose_layout`); None: by measurement alone."""
    spec = registry.resolve(name)
    if spec.is_embedded:
        source = registry.embedded_file(spec)
    elif spec.local_path is not None:
        source = spec.local_path
    else:
        from octomil.models.hub import fetch

        source = fetch(spec.hf_repo or spec.name, alias=spec.name)

    try:
        model, tokenizer, config = _read(source)
    except ModelNotAvailableError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ModelNotAvailableError(
            f"could not load model {spec.name!r} from {source}: {exc}"
        ) from None

    native = native_description(model)
    check = None
    if compact_ok is not None:
        layers, hidden = len(model.model.layers), int(model.args.hidden_size)
        check = lambda fmt: compact_ok(spec.name, str(source), layers, hidden, fmt)  # noqa: E731
    layout = apply_layout(model, choose_layout(model, dtype, check))
    install_fast_modules(model)
    log.info("[engine] %s weights: %s", spec.name, layout.describe(native))
    context = int(
        config.get("max_position_embeddings")
        or getattr(model.args, "max_position_embeddings", 0)
        or 4096
    )
    return LoadedModel(
        name=spec.name,
        model=model,
        tokenizer=tokenizer,
        family=model_family(model),
        anatomy=anatomy_of(model),
        layout=layout,
        native_layout=native,
        context_length=context,
        eos_token_ids=_eos_ids(tokenizer, config),
        source=str(source),
    )


def load_stock_model(loaded: LoadedModel) -> nn.Module:
    """The same weights as ``loaded`` in mlx-lm's own modules and dtype, without Octomil's storage
    changes: the reference that stock ``mlx_lm.generate`` runs, for parity tests and benchmarks."""
    model = _read(Path(loaded.source))[0]
    convert_precision(model, loaded.layout.layout, stock=True)
    return model
