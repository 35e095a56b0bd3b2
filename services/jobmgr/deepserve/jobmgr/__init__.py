"""deepserve.jobmgr service."""
