"""Train, evaluate and publish plugboard modules with PEFT."""
