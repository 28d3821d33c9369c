"""Jobs: QEMU's job state machine, its policies, and the jobs blockd runs (stream)."""
