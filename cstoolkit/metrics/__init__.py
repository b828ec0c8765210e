"""Evaluation metrics (CLIP, CSD, DINO scores)."""
