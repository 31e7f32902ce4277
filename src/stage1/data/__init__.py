"""Images and the sets they come in: image files, datasets, the input pipeline, tar shards, token shards and their
exports. Imports only base."""
