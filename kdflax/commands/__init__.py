"""One module per `kdflax` sub-command; each exposes `main(argv) -> int`."""
