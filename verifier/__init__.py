"""vtpm-verify: the tenant's verifier and the fleet registrar."""
