"""megatron-bolt."""
