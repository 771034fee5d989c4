"""Transformer components, one per module, each firing TransformerLens's hook points."""
