"""One module per method: each turns a loaded source into files in an (empty, temporary) output folder."""
