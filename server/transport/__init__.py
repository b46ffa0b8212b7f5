"""gRPC transport: servicers that decode -> call the engine -> encode, and error mapping."""
