"""The expert catalog: immutable, numbered versions of named expert packages."""
