"""Prefect 3 flows over the `imagic` library: thin wiring, no tensors."""
