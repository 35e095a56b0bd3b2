"""The pod: the task executor shell around one engine (registration, loading, serving, fork)."""
