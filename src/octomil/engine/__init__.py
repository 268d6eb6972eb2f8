"""The decoding engine: layer loop with early exit, KV catch-up, sampling and request stats.

Nothing here knows about HTTP. The server talks to :class:`octomil.engine.engine.Engine`.
"""
