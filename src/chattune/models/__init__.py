"""Models: default-model registry and pull, loading (dtype, device, quantization), training methods."""
