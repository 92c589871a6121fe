"""Reading checkpoints: reference strings, lazy tensor sources, and parameter-name alignment."""
