"""gRPC servicers: translate between the wire and ``serving.models``; nothing else."""
