"""End-to-end checks of every entry point on a CUDA device (marker ``cuda``; ``make test-gpu``)."""
