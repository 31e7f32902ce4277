"""The layer everything stands on: distributed set-up and collectives, precision, atomic files, exchanged tensor files,
config sections, the bounds on sizes files declare."""
