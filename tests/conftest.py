"""Shared fixtures: seeded tiny Hugging Face checkpoints (tests/fixtures/checkpoints.py) and a
real redis-server (tests/fixtures/redis_server.py); the session servers of the end-to-end and
notebook tests (tests/fixtures/served.py)."""

pytest_plugins = ["fixtures.checkpoints", "fixtures.redis_server", "fixtures.served"]
