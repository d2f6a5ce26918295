"""Data: the data folder's format (`format`), token files and their sampler (`tokens`), the sources the
loop reads (`sources`: token folders, map-style datasets) and the library half of `scaletrain prepare`
(`prepare`). Knows nothing of engines."""
