"""The top of the import graph: the `phatgoose` command line (`cli.py`), the demo
(`demo.py`) and the local Flower federation it runs (`federation.py`), which use every other
package (protocol <- phatgoose <- client, coordinator <- app). Nothing imports `app`."""
