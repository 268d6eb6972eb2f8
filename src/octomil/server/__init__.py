"""HTTP front end: OpenAI-compatible API, SSE streaming, telemetry headers, Prometheus metrics.

The server reaches the engine only through :class:`octomil.server.engine_client.EngineClient`,
whose single worker thread owns every MLX call. No layers or tensors here.
"""
