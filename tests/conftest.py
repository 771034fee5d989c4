"""Shared fixtures: seeded tiny Hugging Face checkpoints (tests/fixtures/checkpoints.py) and a
real redis-server (tests/fixtures/redis_server.py)."""

pytest_plugins = ["fixtures.checkpoints", "fixtures.redis_server"]
