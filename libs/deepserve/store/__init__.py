"""State stores: etcd for durable, leased, watched control state; Redis for hot state."""
