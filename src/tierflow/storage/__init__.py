"""Storage tiers below host memory: the NVMe spill file and host staging buffers."""

from tierflow.storage.nvme import Extent, NvmeStore
from tierflow.storage.pool import BufferPool, aligned_empty

__all__ = ["NvmeStore", "Extent", "BufferPool", "aligned_empty"]
