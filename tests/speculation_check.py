"""Shared by the speculation tests: requests decoded together in one scheduler, and each alone
without speculation (the reference its batched tokens must equal)."""

import dataclasses

from octomil.engine.scheduler import Scheduler, SchedulerConfig
from octomil.engine.speculation import SpeculativeSettings


def batched_and_alone(engine, requests, max_batch_size):  # noqa: ANN001, ANN201
    """(each request's tokens decoded beside the others, its tokens alone without speculation,
    the batched generations)."""
    off = SpeculativeSettings("off")
    alone = [
        [e.token_id for e in engine.generate(dataclasses.replace(r, speculative=off))]
        for r in requests
    ]
    scheduler = Scheduler(SchedulerConfig(max_batch_size=max_batch_size))
    gens = [engine.generate(r) for r in requests]
    for g in gens:
        scheduler.submit(g)
    got = {id(g): [] for g in gens}
    while not scheduler.idle:
        for g, e in scheduler.step().events:
            got[id(g)].append(e.token_id)
    return [got[id(g)] for g in gens], alone, gens
