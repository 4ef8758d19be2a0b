"""The library every model-serve service shares."""
