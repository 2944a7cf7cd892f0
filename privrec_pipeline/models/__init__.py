"""Evaluate, publish and serve the trained recommender."""
