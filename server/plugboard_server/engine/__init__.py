"""The inference engine: continuous batching over the frozen model. Knows nothing of gRPC."""
