"""Long-running reliability scripts (fuzz, kill, soak); each prints its figures and exits
0 when every check held, 1 otherwise. The shared machinery is importable from tests."""
