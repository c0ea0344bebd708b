"""The serving path: request service -> tenant-fair batcher -> batch runner -> the frozen model."""
