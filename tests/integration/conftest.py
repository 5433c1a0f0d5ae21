"""Fixtures the integration tests share with the unit tests of the same subject."""

from tests.unit.test_agent import agent_run  # noqa: F401 (a fixture)
