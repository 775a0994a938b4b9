"""Learned modules: read PEFT directories, validate them against the base model, apply them per row."""
