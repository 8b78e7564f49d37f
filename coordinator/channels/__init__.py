"""Release channels: named, moving pointers to releases that follow the catalog."""
