"""Moved: the collector lives in the hub's own package, edge_hub.collector (its stores in edge_hub.stores).
This name stays so that code written against it keeps working; new code imports edge_hub."""
from edge_hub.collector import DEFAULT_TOPIC, DEFAULT_TOPICS, Collector, CollectorStore, receipt_topic, shared

__all__ = ["DEFAULT_TOPIC", "DEFAULT_TOPICS", "Collector", "CollectorStore", "receipt_topic", "shared"]
