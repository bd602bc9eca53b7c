"""The projection runner: fetch the next batch in commit order, apply it, move the checkpoint."""
