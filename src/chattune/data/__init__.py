"""Data pipeline: formats → canonical samples → templates → (input_ids, labels) → batches."""
