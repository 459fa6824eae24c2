"""deqlit tests (a regular package: some installed packages, e.g. torch-fidelity, ship a top-level `tests`)."""
