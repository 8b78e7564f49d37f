"""API tokens: contributors publish under their own namespace, maintainers curate."""
