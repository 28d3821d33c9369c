"""Jobs: QEMU's job state machine, its policies, the engine, and the jobs blockd runs
(stream, commit, and the active commit on the mirror machinery)."""
