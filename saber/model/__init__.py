"""Model access: architecture adapters and loading helpers."""
