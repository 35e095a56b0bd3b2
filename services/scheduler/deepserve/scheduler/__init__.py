"""deepserve.scheduler service."""
