"""Shared fixtures: seeded tiny Hugging Face checkpoints (tests/fixtures/checkpoints.py)."""

pytest_plugins = ["fixtures.checkpoints"]
