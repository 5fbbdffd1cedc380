"""The `loraforge` launcher: renders and submits Jobs. Imports no torch (a test enforces it)."""
