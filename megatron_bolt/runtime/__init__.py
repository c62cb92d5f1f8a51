"""Process groups, megatron-core parallel state, seeds, and the CPU compatibility seam."""

from megatron_bolt.runtime.distributed import device, distributed, initialize, seed_everything, shutdown
from megatron_bolt.runtime.world import WorldInfo, world_from_env

__all__ = ["WorldInfo", "device", "distributed", "initialize", "seed_everything", "shutdown", "world_from_env"]
