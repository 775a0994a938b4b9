"""Loading the frozen base model: local directories, GGUF files, cached hub ids, the embedded default."""

from plugboard_server.models.loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
