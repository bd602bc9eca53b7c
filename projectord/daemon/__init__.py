"""The daemon process: supervision, ownership, the notification listener, signals, systemd."""
