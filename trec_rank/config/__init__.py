"""Typed configs: the feature schema and the experiment (data, model, train, sharding)."""
