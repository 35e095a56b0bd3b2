"""deepserve.gateway service."""
