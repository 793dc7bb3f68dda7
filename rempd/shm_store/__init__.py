"""Node-local weight store: a whole checkpoint in one named /dev/shm segment, attached zero-copy.

The daemon loads it once (load_into_store); every worker attaches it read-only by name
(WeightStore.attach) and copies the row ranges its shard needs (WeightStore.rows).
"""
from rempd.shm_store.loader import CheckpointSource, LoadStats, StoreBuilder, load_into_store
from rempd.shm_store.manifest import (Manifest, ManifestEntry, SegmentState, StoreError,
                                      StoreNotFoundError)
from rempd.shm_store.segments import new_segment_name, reclaim_stale_segments
from rempd.shm_store.store import WeightStore

__all__ = [
    "CheckpointSource", "LoadStats", "Manifest", "ManifestEntry", "SegmentState", "StoreBuilder",
    "StoreError", "StoreNotFoundError", "WeightStore", "load_into_store", "new_segment_name",
    "reclaim_stale_segments",
]
