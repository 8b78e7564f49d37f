"""The top of the import graph: the `phatgoose` command line and the demo, which use every
other package (protocol <- phatgoose <- client, coordinator <- app)."""
