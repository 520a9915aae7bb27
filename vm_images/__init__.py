"""Guest images for the vm and e2e test tiers (see README.md in this directory)."""
