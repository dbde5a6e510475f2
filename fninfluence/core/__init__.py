"""The pure core's shared records and algebra (:mod:`.algebra`: layer statistics and what is computed from them)."""
