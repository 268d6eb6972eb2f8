"""Model loading: alias registry, GGUF reader, weight layout choice, per-family anatomy."""
