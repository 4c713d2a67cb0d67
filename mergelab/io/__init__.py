"""File I/O above the engine: cache folders, hub-layout datasets, gradient statistics files."""
