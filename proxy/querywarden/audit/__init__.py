"""The audit record: a durable, hash-chained log of every session and statement."""
