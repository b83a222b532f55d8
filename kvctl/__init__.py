"""kvctl: inspect, cap and rebalance the KV memory of live engines."""
