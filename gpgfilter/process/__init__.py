"""The processes: command line, configuration, service wiring, metrics."""
