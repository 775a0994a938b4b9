"""Generated gRPC stubs for plugboard's public API (proto/plugboard/v1)."""
