"""The local cluster: etcd, a Redis-protocol server and the five services as processes."""
