"""Examples of sora-async in use: run them from the repository root."""
