"""Exit adapters, gates, exit-policy directories and their loading, on tiny random models."""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import json
import logging
import math
import random

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import (
    NUM_LAYERS,
    make_byte_tokenizer,
    make_tiny_model,
    save_tiny_checkpoint,
    sharpen,
    tiny_engine,
)

from octomil.calibrate import adapters as adapt
from octomil.calibrate.collect import Sequence_, collect_states
from octomil.config import EarlyExitSettings, resolve_early_exit
from octomil.engine.engine import Engine
from octomil.engine.exit_adapters import (
    Adapter,
    AdaptedExitPolicy,
    ExitPolicyBundle,
    LowRankHead,
    ProbeGate,
    resolve_exit_policy,
)
from octomil.engine.exit_policy import entropy_nats
from octomil.engine.policy_store import ExitPolicyError, Manifest, PresetPlacement, weights_hash
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.models.anatomy import Anatomy, anatomy_of

D = 64
DEPTHS = (1, 2, 3)


@pytest.fixture(scope="module")
def model():
    return sharpen(make_tiny_model("llama", seed=3))


@pytest.fixture(scope="module")
def anatomy(model) -> Anatomy:
    return anatomy_of(model)


@pytest.fixture(scope="module")
def states(anatomy):
    rng = random.Random(0)
    seqs = [
        Sequence_(
            i, tuple(rng.choices(range(256), k=6)), tuple(rng.choices(range(256), k=40)), False
        )
        for i in range(8)
    ]
    return collect_states(anatomy, seqs, DEPTHS)


def hidden(seed: int = 0) -> mx.array:
    return mx.random.normal((1, D), key=mx.random.key(seed))


def random_adapter(seed: int) -> Adapter:
    k1, k2 = mx.random.split(mx.random.key(seed))
    return Adapter(0.05 * mx.random.normal((D, D), key=k1), 0.05 * mx.random.normal((D,), key=k2))


def manifest(weights: str = "a" * 64, layers=DEPTHS, presets=None) -> Manifest:
    place = PresetPlacement(
        threshold=0.3, min_layers=2, budget=0.03, method="probe", layers=(2, 3), margin=0.5
    )
    return Manifest(
        model_id="tiny-llama",
        weights_sha256=weights,
        total_layers=NUM_LAYERS,
        hidden_size=D,
        adapter_layers=tuple(layers),
        presets=presets if presets is not None else {"balanced": place},
        created="2026-01-01T00:00:00+00:00",
        octomil_version=octomil.__version__,
        probe_hidden=8,
        timings_ms={"full_token": 1.0},
    )


def probe(bias: float, seed: int = 0) -> ProbeGate:
    k1, k2 = mx.random.split(mx.random.key(seed))
    return ProbeGate(
        0.1 * mx.random.normal((D, 8), key=k1),
        mx.zeros((8,)),
        0.1 * mx.random.normal((8,), key=k2),
        mx.array(bias),
    )


def bundle(weights: str = "a" * 64) -> ExitPolicyBundle:
    return ExitPolicyBundle(
        manifest(weights),
        {d: random_adapter(d) for d in DEPTHS},
        {d: probe(0.0, d) for d in DEPTHS},
    )


# --- adapter math ---------------------------------------------------------------------------------


def test_identity_adapter_is_the_logit_lens(anatomy):
    h = hidden()
    policy = AdaptedExitPolicy(
        0.3, 1, DEPTHS, NUM_LAYERS, adapters={d: Adapter.identity(D) for d in DEPTHS}
    )
    decision = policy.decide(anatomy, h, 2)
    assert mx.array_equal(decision.logits, anatomy.logits(h))
    assert decision.entropy == pytest.approx(entropy_nats(anatomy.logits(h)).item())


def test_adapter_is_affine_before_the_frozen_norm_and_head(anatomy):
    a, h = random_adapter(1), hidden(1)
    decision = AdaptedExitPolicy(math.inf, 1, (2,), NUM_LAYERS, adapters={2: a}).decide(
        anatomy, h, 2
    )
    assert decision.exit
    assert mx.allclose(decision.logits, anatomy.head(anatomy.norm(h + h @ a.A + a.b)), atol=1e-5)


def test_least_squares_start_reduces_the_error_to_the_final_state(states):
    for d in DEPTHS:
        h = states.by_depth[d]
        fitted = adapt.lstsq_adapter(h, states.final)
        assert adapt.weighted_error(fitted, h, states.final) < 0.8 * adapt.weighted_error(
            Adapter.identity(D), h, states.final
        )


def mean_kl(anatomy, states, adapter: Adapter, depth: int) -> float:
    top = adapt.final_top1(anatomy, states.final)

    def final_logp(sl):
        return adapt.final_logprobs(anatomy, mx.array(states.final[sl]))

    return float(
        adapt.score(anatomy, adapter, states.by_depth[depth], top, final_logp)["kl"].mean()
    )


def test_kl_finetuning_lowers_the_kl_and_is_seeded(anatomy, states):
    # A perturbed start, so there is KL to remove (the sharpened tiny model agrees across layers).
    init = {d: Adapter(6 * random_adapter(d).A, random_adapter(d).b) for d in (1, 2)}

    def run():
        return adapt.kl_finetune(
            anatomy, init, states.by_depth, states.final, steps=20, seed=0, lr=1e-2, batch=64
        )

    trained, _ = run()
    for d in (1, 2):
        assert mean_kl(anatomy, states, trained[d], d) < 0.7 * mean_kl(anatomy, states, init[d], d)
    again, _ = run()
    assert all(mx.array_equal(trained[d].A, again[d].A) for d in trained)


def test_collect_states_matches_the_models_forward(model, anatomy):
    seq = Sequence_(0, (5, 6, 7), (8, 9, 10, 11), False)
    st = collect_states(anatomy, [seq, Sequence_(1, (1, 2), (3, 4, 5, 6, 7, 8, 9), True)], (2,))
    # Shortest sequence first; decode feeds prompt + completion[:-1] from position len(prompt) on.
    full = model(mx.array([[5, 6, 7, 8, 9, 10, 11]]))[0]
    got = anatomy.logits(mx.array(st.final[:3]))
    assert mx.allclose(got, full[3:6], atol=1e-4)
    assert st.by_depth[2].shape == (3 + 6, D) and list(st.sampled) == [False] * 3 + [True] * 6


# --- gates ----------------------------------------------------------------------------------------


class CountingHead:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = Anatomy.head

        def head(anat, normed):
            self.calls += 1
            return original(anat, normed)

        monkeypatch.setattr(Anatomy, "head", head)


def test_gate_that_says_no_skips_the_head(anatomy, monkeypatch):
    counter = CountingHead(monkeypatch)
    adapters = {2: random_adapter(2)}
    closed = AdaptedExitPolicy(
        0.3, 1, (2,), NUM_LAYERS, adapters=adapters, method="probe", probes={2: probe(50.0)}
    )
    decision = closed.decide(anatomy, hidden(), 2)
    assert (decision.exit, decision.logits, decision.entropy) == (False, None, None)
    assert counter.calls == 0
    opened = AdaptedExitPolicy(
        math.inf, 1, (2,), NUM_LAYERS, adapters=adapters, method="probe", probes={2: probe(-50.0)}
    )
    decision = opened.decide(anatomy, hidden(), 2)
    assert decision.exit and decision.logits is not None and counter.calls == 1


def test_lowrank_head_at_full_rank_reproduces_the_head(anatomy):
    low = LowRankHead.from_anatomy(anatomy, D)
    normed = anatomy.norm(hidden(4))
    assert mx.allclose(low.logits(normed), anatomy.head(normed), atol=1e-3)


def test_probe_learns_to_predict_log_entropy(anatomy, states):
    a = adapt.lstsq_adapter(states.by_depth[2], states.final)
    ent = adapt.score(anatomy, a, states.by_depth[2], adapt.final_top1(anatomy, states.final))[
        "entropy"
    ]
    gate = adapt.train_probe(anatomy, a, states.by_depth[2], ent, hidden=16, seed=0, steps=300)
    pred = adapt.probe_scores(anatomy, a, gate, states.by_depth[2])
    target = np.log(np.maximum(ent, 1e-4))
    assert np.mean((pred - target) ** 2) < np.var(target)


# --- placement ------------------------------------------------------------------------------------


def test_placement_checks_nowhere_when_exits_do_not_pay():
    from octomil.calibrate.thresholds import Costs, Replay, best_placement

    n = 200
    replay = Replay(
        {d: np.zeros(n) for d in DEPTHS}, {d: np.ones(n, bool) for d in DEPTHS}, {}, NUM_LAYERS
    )
    free = Costs(10.0, pipeline=0.0, head_check=2.0, gate={}, exit_per_layer=0.0, exit_fixed=0.0)
    best, fewest = best_placement(replay, free, "entropy", DEPTHS, 0.3, 1, 0.01)
    assert best.layers == () and best.expected_speedup == 1.0
    assert (
        fewest.layers[0] == 1 and fewest.avg_layers == 1.0
    )  # everything exits at once, and agrees
    paying = Costs(10.0, pipeline=0.0, head_check=2.0, gate={}, exit_per_layer=2.0, exit_fixed=0.0)
    best, _ = best_placement(replay, paying, "entropy", DEPTHS, 0.3, 1, 0.01)
    assert best.layers == (1,) and best.expected_speedup > 1.5


def test_placement_respects_the_disagreement_budget():
    from octomil.calibrate.thresholds import Costs, Replay, best_placement

    n = 100
    agree = {1: np.arange(n) >= 10, 2: np.arange(n) >= 2, 3: np.ones(n, bool)}  # 10%, 2%, 0% wrong
    replay = Replay({d: np.zeros(n) for d in DEPTHS}, agree, {}, NUM_LAYERS)
    costs = Costs(10.0, pipeline=0.0, head_check=1.0, gate={}, exit_per_layer=2.0, exit_fixed=0.0)
    assert best_placement(replay, costs, "entropy", DEPTHS, 0.3, 1, 0.05)[0].layers == (2,)
    assert best_placement(replay, costs, "entropy", DEPTHS, 0.3, 1, 0.01)[0].layers == (3,)


# --- policy directories ---------------------------------------------------------------------------


def test_policy_directory_round_trip(tmp_path):
    b = bundle()
    b.save(tmp_path / "p")
    loaded = ExitPolicyBundle.load(tmp_path / "p")
    assert loaded.manifest == b.manifest
    data = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert (
        data["format"] == "octomil-exit-policy" and data["octomil_version"] == octomil.__version__
    )
    for d in DEPTHS:  # stored as fp16
        assert mx.allclose(
            loaded.adapters[d].A, b.adapters[d].A.astype(mx.float16).astype(mx.float32)
        )
        assert mx.allclose(loaded.probes[d].w1, b.probes[d].w1, atol=1e-3)


def test_a_policy_records_its_weights_format_and_older_ones_read_as_fp32(tmp_path):
    b = bundle()
    b.manifest = Manifest(**{**b.manifest.__dict__, "weights_format": "q8"})
    b.save(tmp_path / "q8")
    assert ExitPolicyBundle.load(tmp_path / "q8").manifest.weights_format == "q8"
    bundle().save(tmp_path / "old")
    data = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del data["weights_format"]  # written before formats were recorded
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(data))
    assert ExitPolicyBundle.load(tmp_path / "old").manifest.weights_format == "float32"


def test_policy_made_for_other_weights_is_refused(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"not the weights the policy was made for")
    bundle("b" * 64).save(tmp_path / "p")
    with pytest.raises(ExitPolicyError, match="made for other weights"):
        resolve_exit_policy("tiny-llama", str(weights), NUM_LAYERS, D, str(tmp_path / "p"))
    with pytest.raises(ExitPolicyError, match="not an exit-policy directory"):
        resolve_exit_policy("tiny-llama", str(weights), NUM_LAYERS, D, str(tmp_path))
    bundle(weights_hash(weights)).save(tmp_path / "ok")
    assert (
        resolve_exit_policy("tiny-llama", str(weights), NUM_LAYERS, D, str(tmp_path / "ok")).bundle
        is not None
    )


def test_found_policy_for_other_weights_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OCTOMIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OCTOMIL_EXIT_POLICY", raising=False)
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"weights")
    bundle("c" * 64).save(tmp_path / "cache" / "policies" / "tiny-llama")
    with caplog.at_level(logging.WARNING):
        choice = resolve_exit_policy("tiny-llama", str(weights), NUM_LAYERS, D)
    assert choice.bundle is None and not choice.raw_head and "octomil calibrate" in choice.status
    assert "made for other weights" in caplog.text


def test_placement_and_method_override(anatomy):
    b = bundle()
    balanced = resolve_early_exit("balanced")
    policy = b.policy(balanced, anatomy)
    assert policy.method == "probe" and policy.exit_layers == (2, 3) and policy.margin == 0.5
    assert policy.min_layers == 2
    entropy = b.policy(balanced, anatomy, method="entropy", layers=(1, 2, 3))
    assert entropy.method == "entropy" and entropy.exit_layers == (2, 3)  # min depth still applies
    assert b.policy(balanced, anatomy, layers=()) is None  # nothing placed: full depth
    assert b.policy(EarlyExitSettings(), anatomy) is None
    with pytest.raises(ExitPolicyError, match="unknown exit decision method"):
        b.policy(balanced, anatomy, method="magic")


# --- the engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    """The tiny model saved as an mlx-lm directory, so ``Engine.load`` reads it from disk."""
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_checkpoint(path, model, make_byte_tokenizer(), eos_token_id=256)
    return path


def test_engine_loads_a_policy_dir_and_exits_with_it(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OCTOMIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OCTOMIL_EXIT_POLICY", raising=False)
    b = bundle(weights_hash(model_dir))
    b.manifest.presets["balanced"] = PresetPlacement(0.3, 2, 0.03, "entropy", (2, 3))
    manifest = Manifest(**{**b.manifest.__dict__, "model_id": model_dir.name})
    ExitPolicyBundle(manifest, b.adapters, b.probes).save(
        tmp_path / "cache" / "policies" / model_dir.name
    )
    settings = EarlyExitSettings(threshold=1e9, min_layers_fraction=0.5)  # every check exits
    engine = Engine.load(str(model_dir), early_exit=settings)
    assert engine.exit_bundle is not None and "exit policy" in engine.exit_choice.status
    policy = engine.policy_for(None)
    assert isinstance(policy, AdaptedExitPolicy) and policy.exit_layers == (2, 3)
    gen = engine.generate(
        GenerationRequest((1, 2, 3), SamplingParams(max_tokens=6, ignore_eos=True))
    )
    events = list(gen)
    assert [e.layers_used for e in events[1:]] == [2] * 4 + [
        NUM_LAYERS
    ]  # 4 pending rows, then a flush


def test_engine_without_a_policy_serves_full_depth_with_a_warning(
    model_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("OCTOMIL_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("OCTOMIL_EXIT_POLICY", raising=False)
    with caplog.at_level(logging.WARNING):
        engine = Engine.load(str(model_dir), early_exit=resolve_early_exit("fast"))
    assert engine.policy_for(None) is None
    assert "no exit policy" in caplog.text and "full depth" in caplog.text
    lens = Engine.load(str(model_dir), early_exit=resolve_early_exit("fast"), exit_policy="lens")
    assert lens.policy_for(None) is not None and lens.exit_bundle is None


def test_in_memory_engine_keeps_the_raw_head(model, byte_tokenizer):
    engine = tiny_engine(model, byte_tokenizer, early_exit=resolve_early_exit("fast"))
    assert engine.policy_for(None) is not None and engine.exit_choice.raw_head


def test_calibrate_end_to_end_on_a_tiny_model(model, tmp_path, byte_tokenizer):
    from octomil.calibrate.pipeline import CalibrationConfig, calibrate, retime, save_replay

    engine = tiny_engine(model, byte_tokenizer)
    prompts = tuple((c, f"{c} prompt {i}") for c in ("a", "b") for i in range(4))
    config = CalibrationConfig(tokens=200, max_new_tokens=24, steps=3, timing_repeats=2, seed=1)
    b = calibrate(engine.loaded, engine.encode_chat, config, prompts=prompts)
    b.save(tmp_path / "p")
    save_replay(tmp_path / "p", b.replay, b.timing_prompt)
    loaded = ExitPolicyBundle.load(tmp_path / "p")
    m = loaded.manifest
    assert set(m.presets) == {"quality", "balanced", "fast"} and m.adapter_layers == (1, 2, 3)
    for p in m.presets.values():
        assert p.method in ("entropy", "probe", "lowrank") and set(p.layers) <= {1, 2, 3}
        assert p.measured["disagreement"] <= p.budget
    assert m.heldout["tokens"] > 0 and m.timings_ms["full_token"] > 0
    # --retime: same adapters, costs re-measured, placement redone from the saved replay.
    again = retime(engine.loaded, loaded, tmp_path / "p", repeats=1)
    assert (
        again.manifest.adapter_layers == m.adapter_layers
        and "retimed" in again.manifest.calibration
    )
    assert set(again.manifest.presets) == set(m.presets)
