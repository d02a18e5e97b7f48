"""Model I/O: loading what users name, our compressed dirs, the transformers plugin, export."""
