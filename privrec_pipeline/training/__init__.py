"""Federated, user-level DP training of the item-side recommender (plain PyTorch)."""
