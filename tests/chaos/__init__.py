"""The chaos battery: faults against the real broker, one table row per fault (`make chaos`)."""
