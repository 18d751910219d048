"""Generated gRPC modules (protos/generate.py); a package so wheels and images include them."""
