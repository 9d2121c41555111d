"""Reading the shards: index (ShardIndex), transforms (build_transform), loader (build_loader)."""
from sdlora_ds.data.index import ShardIndex
from sdlora_ds.data.loader import BadDataError, TaskCache, build_loader, clear_caches
from sdlora_ds.data.transforms import build_transform

__all__ = ["ShardIndex", "BadDataError", "TaskCache", "build_loader", "clear_caches", "build_transform"]
