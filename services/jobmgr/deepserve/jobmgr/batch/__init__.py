"""Batch API jobs: a JSONL file of chat requests run at low priority on serving instances."""
