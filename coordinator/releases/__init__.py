"""Releases: immutable, numbered selections of expert versions with a routing method."""
