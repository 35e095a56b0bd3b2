"""deepserve.podpool service."""
