"""Registered base models: the identity and linear modules uploads are validated against."""
