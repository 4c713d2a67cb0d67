"""Model-format adapters: converting other libraries' checkpoints into open_clip state dicts."""
