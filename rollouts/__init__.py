"""Environments, rollout collection and Ray workers (depends on worldmodel, never on agents)."""
