"""deepserve.flowserve service."""
