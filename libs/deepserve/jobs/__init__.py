"""Job records and the job store: the contract jobmgr writes and every reader shares."""
