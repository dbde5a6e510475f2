"""Zarr v3 persistence: factors and scores stores, partitions, completion markers, argument checks."""
