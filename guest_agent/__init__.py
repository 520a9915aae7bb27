"""vtpm-guest: the in-guest agent (Python standard library only)."""
