"""Helpers shared by the test tiers: the broker, worker processes, Kafka clients."""
