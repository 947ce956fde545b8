"""Command-line tools: the CLI, drill, reference training loop and model, launcher, inspect and verify."""
