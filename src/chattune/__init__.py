"""chattune: fine-tune chat LLMs on your own data, and put the result to work."""

__version__ = "0.1.0"
