"""A stock mlx-lm model directory made from a GGUF file, for ``mlx_lm.server``.

``mlx_lm.server`` loads a model only from a directory (config.json, safetensors, tokenizer files)
or from the Hugging Face hub, which a benchmark here must never touch. This writes that directory
from the GGUF Octomil serves, with the same weights Octomil computes on: Octomil's GGUF reader
(llama.cpp names mapped to mlx-lm's, ``rope_traditional`` for llama.cpp's Q/K layout), then
dequantized to float32 exactly as ``report_worker.py``'s stock configuration does, and the
tokenizer and chat template rebuilt from the GGUF metadata. The directory is reused while the
GGUF file is unchanged (``source.json`` records its path, size and mtime).

    .venv/bin/python benchmarks/mlx_model_dir.py MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import octomil  # noqa: F401  first: loads OpenBLAS before anything imports mlx

# isort: split
import argparse
import json
import shutil
from pathlib import Path


def _stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {
        "gguf": str(gguf.resolve()),
        "bytes": st.st_size,
        "mtime": st.st_mtime,
        "dtype": "float32",
    }


def is_current(gguf: Path, out: Path) -> bool:
    """Whether ``out`` was written from this very GGUF file."""
    try:
        return json.loads((out / "source.json").read_text()) == _stamp(gguf)
    except (OSError, ValueError):
        return False


def export(gguf: Path, out: Path) -> Path:
    """Write (or keep) the float32 mlx-lm directory of ``gguf`` at ``out``; return ``out``."""
    if is_current(gguf, out):
        return out
    from mlx_lm.utils import save_config, save_model

    from octomil.models.gguf import load_gguf
    from octomil.models.gguf_tokenizer import build_tokenizer
    from octomil.models.layout import convert_precision

    model, config, meta = load_gguf(gguf)
    convert_precision(model, "float32")
    shutil.rmtree(out, ignore_errors=True)
    save_model(out, model, donate_model=True)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        config["eos_token_id"] = int(eos.item() if hasattr(eos, "item") else eos)
    save_config(config, out / "config.json")
    build_tokenizer(meta).save_pretrained(out)
    (out / "source.json").write_text(json.dumps(_stamp(gguf)) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    print(export(args.gguf, args.out))


if __name__ == "__main__":
    main()
