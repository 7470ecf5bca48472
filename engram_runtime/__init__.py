"""engram_runtime package."""
