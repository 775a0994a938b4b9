"""The gRPC layer: typed servicers that turn protobuf into engine calls and errors into status codes."""
