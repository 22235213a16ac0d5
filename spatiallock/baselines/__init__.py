"""Baselines the benchmark compares SpatialLock with."""
