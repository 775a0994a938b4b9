"""Train, evaluate and publish plugboard modules with PEFT (the `plugboard-tune` command)."""

__version__ = "0.1.0"
