"""plugboard's server: one frozen base model, learned modules per request, served over gRPC."""

__version__ = "0.1.0"
