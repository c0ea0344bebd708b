"""The token-level engine: continuous batching of soft-prompted rows over one frozen T5, one decoder step at a time."""
