"""The hooks layer: the hook protocol, the timer, and the standard hooks (private)."""
