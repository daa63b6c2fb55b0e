"""Use a tuned model: load base + adapter with the training template, generate, chat."""
