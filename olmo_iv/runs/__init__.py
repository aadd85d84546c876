"""Writers of run folders: each takes a library result and writes its files atomically."""
