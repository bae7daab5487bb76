"""Fixtures shared by every test layer; each lives in a module of tests/fixtures named after what it provides."""

pytest_plugins = [
    "tests.fixtures.processes",
    "tests.fixtures.redis_server",
    "tests.fixtures.discovery",
]
