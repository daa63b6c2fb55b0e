"""Training: a thin transformers Trainer subclass, callbacks for logs/progress/plots, and the recipe."""
