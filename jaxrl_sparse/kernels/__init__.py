"""Custom kernels (Pallas/Triton on the GPU, interpreted on the CPU)."""
