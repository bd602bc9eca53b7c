"""The write side: commands, the command store, aggregates and the dispatcher."""
