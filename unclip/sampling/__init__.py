"""Text -> image with trained checkpoints (pipeline), the paper's manipulations, and the body of
sample.py (run)."""
