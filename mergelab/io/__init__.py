"""File I/O: lazy checkpoint reading and atomic, streamed safetensors writing."""
