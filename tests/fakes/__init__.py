"""Fakes for what cannot run on the CI machine (typed against the ports they replace)."""
