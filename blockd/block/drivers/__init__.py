"""Block drivers, one module each; ``DRIVERS`` maps QMP driver names to classes."""
