"""Where modules come from: the registry interface and its stores."""
