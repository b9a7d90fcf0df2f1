"""CPU-only machinery: compiled kernels, conv lowering choice, host memory, the build cache."""
