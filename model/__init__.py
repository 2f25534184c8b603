"""Qwen model wrapper (patching with the fused kernels) and the KV-cache decoder with budget forcing."""
