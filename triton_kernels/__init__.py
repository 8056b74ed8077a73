"""Fast paths (Triton on GPU, PyTorch fallback elsewhere); installs as vllm_defensive.triton_kernels."""
