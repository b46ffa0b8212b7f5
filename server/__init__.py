"""normserve server: the engine (layers, state, locking), the gRPC transport on top of
it, metrics, settings and the process entry point."""
