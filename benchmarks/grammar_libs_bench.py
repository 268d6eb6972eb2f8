"""Which constrained-decoding library: per-token mask cost and JSON-Schema coverage on this CPU.

For the embedded model's tokenizer (SmolLM2, 49,152 tokens) and the schema set of
``prompts/structured_cases.json`` this measures, for llguidance and outlines-core:

- ``compile_s``: building the per-schema state (llguidance: the matcher; outlines-core: the
  regex index over the whole vocabulary, done once per schema);
- ``mask_us``: computing the allowed-token mask for one step (the library's own fill into an
  int32 bitmask), mean over every step of a walk that writes the schema's example instance;
- ``to_mx_us``: turning that bitmask into the boolean ``mx.array`` the engine applies;
- ``advance_us``: accepting the chosen token;
- ``ff_share`` (llguidance only): the share of the walk's tokens that were forced (one allowed
  token), i.e. could be fast-forwarded without a model pass;
- ``coverage``: the schemas (and keywords) each library compiles.

xgrammar 0.2.x is not measured: ``import xgrammar`` imports torch (and its wheel requires
torch and triton), a >1 GB dependency the CPU server does not otherwise need. The engine's decode
time per token is measured in the same run (full depth, batch 1) to express the mask as a share
of it. Bounded: ~1 min. Writes ``results/grammar_libs.json``.

    .venv/bin/python benchmarks/grammar_libs_bench.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).parent
CASES = HERE / "prompts" / "structured_cases.json"
MAX_STEPS = 64


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed (printable stand-in character -> byte)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tokenizer) -> list[bytes]:
    dec = _byte_decoder()
    out = [b""] * len(tokenizer)
    for s, i in tokenizer.get_vocab().items():
        if i < len(out) and s not in tokenizer.all_special_tokens:
            out[i] = bytes(dec.get(c, 0) for c in s) if all(c in dec for c in s) else s.encode()
    return out


class Walker:
    """Picks, among the allowed tokens, the longest one that continues the target text (else the
    lowest allowed id): a deterministic walk both libraries take over the same text."""

    def __init__(self, tokens: list[bytes]) -> None:
        self.tokens = tokens

    def pick(self, allowed: np.ndarray, rest: bytes) -> int:
        best, best_len = int(allowed[0]) if len(allowed) else -1, 0
        for t in allowed.tolist():
            b = self.tokens[t]
            if b and len(b) > best_len and rest.startswith(b):
                best, best_len = t, len(b)
        return best


def _bits_to_ids(bits: np.ndarray, vocab: int) -> np.ndarray:
    flat = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(flat)


def to_mx(bits: np.ndarray, vocab: int) -> mx.array:
    """The engine's conversion: int32 bitmask -> (vocab,) bool mx.array."""
    flat = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab]
    return mx.array(flat.astype(np.bool_))


def bench_llguidance(tokenizer, vocab: int, cases: dict, walker: Walker, eos: int) -> dict:
    import llguidance
    import llguidance.hf
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    setup_s = time.perf_counter() - t0
    out: dict = {"tokenizer_setup_s": round(setup_s, 3), "schemas": {}}
    for name, case in cases.items():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            case["schema"], defaults={"whitespace_flexible": False}
        )
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        compile_s = time.perf_counter() - t0
        if m.is_error():
            out["schemas"][name] = {"error": m.get_error()}
            continue
        target = json.dumps(case["example"], separators=(",", ":")).encode()
        bits = allocate_token_bitmask(1, vocab)
        mask_t, conv_t, adv_t, steps, forced = [], [], [], 0, 0
        while not m.is_stopped() and steps < MAX_STEPS:
            t0 = time.perf_counter()
            fill_next_token_bitmask(m, bits)
            t1 = time.perf_counter()
            mx.eval(to_mx(bits[0], vocab))
            t2 = time.perf_counter()
            allowed = _bits_to_ids(bits[0], vocab)
            forced += int(len(allowed) == 1)
            tok = eos if (len(target) == 0 and eos in allowed) else walker.pick(allowed, target)
            t3 = time.perf_counter()
            m.consume_token(tok)
            adv_t.append(time.perf_counter() - t3)
            mask_t.append(t1 - t0)
            conv_t.append(t2 - t1)
            target = target[len(walker.tokens[tok]) :] if tok != eos else b""
            steps += 1
        out["schemas"][name] = {
            "compile_s": round(compile_s, 4),
            "steps": steps,
            "mask_us": round(1e6 * float(np.mean(mask_t)), 1),
            "to_mx_us": round(1e6 * float(np.mean(conv_t)), 1),
            "advance_us": round(1e6 * float(np.mean(adv_t)), 1),
            "ff_share": round(forced / steps, 3),
            "completed": not m.is_error() and m.is_accepting(),
        }
    return out


def bench_outlines(tokenizer, vocab: int, cases: dict, walker: Walker, eos: int) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    mapping: dict[bytes, list[int]] = {}
    for i, b in enumerate(walker.tokens):
        if b and i != eos:
            mapping.setdefault(b, []).append(i)
    t0 = time.perf_counter()
    voc = Vocabulary(eos, mapping)
    out: dict = {"tokenizer_setup_s": round(time.perf_counter() - t0, 3), "schemas": {}}
    for name, case in cases.items():
        try:
            t0 = time.perf_counter()
            guide = Guide(Index(build_regex_from_schema(json.dumps(case["schema"])), voc))
            compile_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001  the library's refusal is the measurement
            out["schemas"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        target = json.dumps(case["example"], separators=(",", ":")).encode()
        bits = np.zeros((vocab + 31) // 32, dtype=np.int32)
        mask_t, conv_t, adv_t, steps = [], [], [], 0
        while not guide.is_finished() and steps < MAX_STEPS:
            t0 = time.perf_counter()
            guide.write_mask_into(bits.ctypes.data, bits.size, 4)
            t1 = time.perf_counter()
            mx.eval(to_mx(bits, vocab))
            t2 = time.perf_counter()
            allowed = _bits_to_ids(bits, vocab)
            tok = eos if (len(target) == 0 and eos in allowed) else walker.pick(allowed, target)
            t3 = time.perf_counter()
            guide.advance(tok)
            adv_t.append(time.perf_counter() - t3)
            mask_t.append(t1 - t0)
            conv_t.append(t2 - t1)
            target = target[len(walker.tokens[tok]) :] if tok != eos else b""
            steps += 1
        out["schemas"][name] = {
            "compile_s": round(compile_s, 4),
            "steps": steps,
            "mask_us": round(1e6 * float(np.mean(mask_t)), 1),
            "to_mx_us": round(1e6 * float(np.mean(conv_t)), 1),
            "advance_us": round(1e6 * float(np.mean(adv_t)), 1),
        }
    return out


# One small schema per keyword beyond the test set: which ones each library compiles.
COVERAGE = {
    "$ref/$defs": {
        "$defs": {"p": {"type": "integer"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/p"}},
    },
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    "allOf": {
        "allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]
    },
    "format: date-time": {"type": "string", "format": "date-time"},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "min/maxProperties": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "const": {"const": "fixed"},
    "recursive $ref": {
        "$defs": {
            "n": {
                "type": "object",
                "properties": {"next": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}},
            }
        },
        "$ref": "#/$defs/n",
    },
    "not": {"not": {"type": "string"}},
}


def coverage(tokenizer, vocab: int, walker: Walker, eos: int) -> dict:
    import llguidance
    import llguidance.hf
    from outlines_core import Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    mapping: dict[bytes, list[int]] = {}
    for i, b in enumerate(walker.tokens):
        if b and i != eos:
            mapping.setdefault(b, []).append(i)
    voc = Vocabulary(eos, mapping)
    out = {}
    for name, schema in COVERAGE.items():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        llg = "ok" if not matcher.is_error() else matcher.get_error()[:120]
        try:
            Index(build_regex_from_schema(json.dumps(schema)), voc)
            oc = "ok"
        except Exception as exc:  # noqa: BLE001  the library's refusal is the measurement
            oc = f"{type(exc).__name__}: {str(exc)[:120]}"
        out[name] = {"llguidance": llg, "outlines_core": oc}
    return out


def decode_ms_per_token(tokens: int = 24) -> float:
    from octomil.engine.engine import Engine
    from octomil.engine.types import GenerationRequest, SamplingParams

    engine = Engine.load(None)
    prompt = engine.encode_chat([{"role": "user", "content": "Tell me about the sea."}])
    gen = engine.generate(
        GenerationRequest(tuple(prompt), SamplingParams(max_tokens=tokens, ignore_eos=True))
    )
    for _ in gen:
        pass
    return 1000.0 / gen.stats.decode_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE / "results" / "grammar_libs.json"))
    args = parser.parse_args()
    from octomil.models.loader import load

    loaded = load(None)
    tokenizer = loaded.tokenizer
    vocab = int(loaded.model.args.vocab_size)
    eos = int(tokenizer.eos_token_id)
    cases = json.loads(CASES.read_text())["schemas"]
    walker = Walker(token_bytes(tokenizer))
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "load_avg": os.getloadavg(),
        "vocab": vocab,
        "llguidance": bench_llguidance(tokenizer, vocab, cases, walker, eos),
        "outlines_core": bench_outlines(tokenizer, vocab, cases, walker, eos),
        "coverage": coverage(tokenizer, vocab, walker, eos),
        "xgrammar": {"error": "not measured: `import xgrammar` requires torch (and triton)"},
        "decode_ms_per_token": round(decode_ms_per_token(), 2),
    }
    for lib in ("llguidance", "outlines_core"):
        rows = [s for s in result[lib]["schemas"].values() if "mask_us" in s]
        total = sum(s["mask_us"] + s["to_mx_us"] + s["advance_us"] for s in rows) / len(rows)
        result[lib]["mean_per_token_us"] = round(total, 1)
        result[lib]["share_of_decode"] = round(total / 1000 / result["decode_ms_per_token"], 4)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
