"""The engine: Imagic's three stages on a diffusers pipeline, and what they need — config and presets, the
built-in models, loading, the editor, sampling, scores and selection. It knows nothing of manifests,
batches, storage or Prefect; importing this package imports nothing heavy (torch loads with the editor)."""
