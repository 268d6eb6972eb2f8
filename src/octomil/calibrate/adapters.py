"""Training exit adapters and gate probes (the BRIEF's recipe that worked on the embedded model).

Adapters (``h -> h + h A + b`` before the frozen final norm and head; Belrose et al., "Eliciting
Latent Predictions from Transformers with the Tuned Lens", 2023):

1. closed-form start: weighted least squares from the layer-``d`` state to the final state, weights
   ``1 / rms(h_final)^2`` (the final norm divides by the rms, so this matches what the head sees);
2. KL(final || adapter) fine-tuning with Adam, lr 3e-4 with cosine decay, 128 tokens a step, all
   depths together. Training from zero is much worse for the same compute; lr 3e-3 diverges.

Probes: a tiny MLP per depth predicting log-entropy of the adapted distribution from the normed
adapted state, so a gate can skip the head when the check would fail anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from octomil.engine.exit_adapters import LOG_EPS, Adapter, ProbeGate
from octomil.engine.exit_policy import entropy_nats
from octomil.models.anatomy import Anatomy

Progress = Callable[[int], None]

RIDGE = 1e-3  # relative to the mean diagonal of the weighted Gram matrix
HEAD_CHUNK = 256  # tokens per head evaluation when scoring (bounds the (chunk, vocab) logits)


def lstsq_adapter(h: np.ndarray, final: np.ndarray) -> Adapter:
    """Weighted ridge least squares for ``h + h A + b ~= final`` (weights 1/rms(final)^2)."""
    x = h.astype(np.float64)
    y = final.astype(np.float64) - x
    w = 1.0 / np.maximum(np.mean(final.astype(np.float64) ** 2, axis=1), 1e-12)
    X = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    gram = (X * w[:, None]).T @ X
    ridge = RIDGE * np.trace(gram) / gram.shape[0]
    reg = np.eye(gram.shape[0]) * ridge
    reg[-1, -1] = 0.0  # do not shrink the bias
    sol = np.linalg.solve(gram + reg, (X * w[:, None]).T @ y)
    return Adapter(mx.array(sol[:-1].astype(np.float32)), mx.array(sol[-1].astype(np.float32)))


def weighted_error(adapter: Adapter, h: np.ndarray, final: np.ndarray) -> float:
    """Mean of ||adapter(h) - final||^2 / rms(final)^2: what :func:`lstsq_adapter` minimises."""
    pred = np.asarray(adapter(mx.array(h)))
    w = 1.0 / np.maximum(np.mean(final**2, axis=1), 1e-12)
    return float(np.mean(np.sum((pred - final) ** 2, axis=1) * w))


def final_logprobs(anatomy: Anatomy, final: mx.array) -> mx.array:
    logits = anatomy.logits(final).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kl_finetune(
    anatomy: Anatomy,
    adapters: dict[int, Adapter],
    states: dict[int, np.ndarray],
    final: np.ndarray,
    steps: int,
    seed: int,
    lr: float = 3e-4,
    batch: int = 128,
    progress: Progress | None = None,
) -> tuple[dict[int, Adapter], list[float]]:
    """Fine-tune all adapters together by KL(final || adapter); returns them and the loss curve."""
    depths = sorted(adapters)
    params = {str(d): {"A": adapters[d].A, "b": adapters[d].b} for d in depths}
    optimizer = optim.Adam(learning_rate=optim.cosine_decay(lr, max(steps, 1)))
    rng = np.random.default_rng(seed)

    def loss_fn(p, xs, target_logp):
        target_p = mx.exp(target_logp)
        total = mx.array(0.0)
        for d in depths:
            x = xs[d]
            logits = anatomy.logits(x + x @ p[str(d)]["A"] + p[str(d)]["b"]).astype(mx.float32)
            logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            total = total + (target_p * (target_logp - logq)).sum(axis=-1).mean()
        return total / len(depths)

    grad_fn = mx.value_and_grad(loss_fn)
    losses = []
    n = len(final)
    for _ in range(steps):
        idx = rng.choice(n, size=min(batch, n), replace=False)
        xs = {d: mx.array(states[d][idx]) for d in depths}
        target = mx.stop_gradient(final_logprobs(anatomy, mx.array(final[idx])))
        loss, grads = grad_fn(params, xs, target)
        optimizer.update(params, grads)
        mx.eval(params, optimizer.state, loss)
        losses.append(float(loss.item()))
        if progress is not None:
            progress(1)
    return {d: Adapter(params[str(d)]["A"], params[str(d)]["b"]) for d in depths}, losses


def score(
    anatomy: Anatomy,
    adapter: Adapter | None,
    h: np.ndarray,
    final_top1: np.ndarray,
    final_logp: Callable[[slice], mx.array] | None = None,
) -> dict[str, np.ndarray]:
    """Per token at one depth: entropy (nats) and top-1 of the (adapted) distribution, whether the
    top-1 equals the final layer's, and KL(final || adapted) when ``final_logp`` is given."""
    ents, tops, kls = [], [], []
    for lo in range(0, len(h), HEAD_CHUNK):
        x = mx.array(h[lo : lo + HEAD_CHUNK])
        x = adapter(x) if adapter is not None else x
        logits = anatomy.logits(x).astype(mx.float32)
        ent = entropy_nats(logits)
        top = mx.argmax(logits, axis=-1)
        out = [ent, top]
        if final_logp is not None:
            logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            tp = final_logp(slice(lo, lo + HEAD_CHUNK))
            out.append((mx.exp(tp) * (tp - logq)).sum(axis=-1))
        mx.eval(out)
        ents.append(np.asarray(ent))
        tops.append(np.asarray(top))
        if final_logp is not None:
            kls.append(np.asarray(out[2]))
    entropy = np.concatenate(ents)
    top1 = np.concatenate(tops)
    res = {"entropy": entropy, "top1": top1, "agree": top1 == final_top1}
    if kls:
        res["kl"] = np.concatenate(kls)
    return res


def final_top1(anatomy: Anatomy, final: np.ndarray) -> np.ndarray:
    out = []
    for lo in range(0, len(final), HEAD_CHUNK):
        top = mx.argmax(anatomy.logits(mx.array(final[lo : lo + HEAD_CHUNK])), axis=-1)
        out.append(np.asarray(top))
    return np.concatenate(out)


class _Probe(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, hidden)
        self.l2 = nn.Linear(hidden, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.l2(nn.gelu(self.l1(x)))[..., 0]


def train_probe(
    anatomy: Anatomy,
    adapter: Adapter,
    h: np.ndarray,
    entropy: np.ndarray,
    hidden: int,
    seed: int,
    steps: int = 400,
    lr: float = 2e-3,
    weight_decay: float = 1e-2,
) -> ProbeGate:
    """Fit ``normed(adapter(h)) -> log(entropy)`` (MSE, full batch AdamW)."""
    mx.random.seed(seed)
    x = anatomy.norm(adapter(mx.array(h)))
    mean = x.mean(axis=0)
    std = mx.sqrt(x.var(axis=0) + 1e-6)
    xs = (x - mean) / std  # standardised inputs train faster; folded into w1/b1 afterwards
    y = mx.log(mx.maximum(mx.array(entropy), LOG_EPS))
    model = _Probe(x.shape[1], hidden)
    opt = optim.AdamW(learning_rate=lr, weight_decay=weight_decay)

    def loss_fn(m):
        return ((m(xs) - y) ** 2).mean()

    step = nn.value_and_grad(model, loss_fn)
    for _ in range(steps):
        _, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    # Fold the standardisation into layer 1: ((x - m) / s) W + c == x (W / s) + (c - (m / s) W)
    w1 = model.l1.weight.T / std[:, None]  # (D, H)
    b1 = model.l1.bias - (mean / std) @ model.l1.weight.T
    gate = ProbeGate(w1, b1, model.l2.weight[0], model.l2.bias[0])
    mx.eval(gate.w1, gate.b1, gate.w2, gate.b2)
    return gate


def probe_scores(anatomy: Anatomy, adapter: Adapter, gate: ProbeGate, h: np.ndarray) -> np.ndarray:
    return np.asarray(gate.predict(anatomy.norm(adapter(mx.array(h)))))


def lowrank_scores(anatomy: Anatomy, adapter: Adapter, lowrank, h: np.ndarray) -> np.ndarray:
    out = []
    for lo in range(0, len(h), HEAD_CHUNK):
        normed = anatomy.norm(adapter(mx.array(h[lo : lo + HEAD_CHUNK])))
        ent = entropy_nats(lowrank.logits(normed))
        out.append(np.asarray(mx.log(mx.maximum(ent, LOG_EPS))))
    return np.concatenate(out)
