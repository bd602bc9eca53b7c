"""The control socket: the server, its operations, the CLI's client, status, health, metrics."""
