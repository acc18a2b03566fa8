"""build-negatives, cache -> negatives file: the stage's entry point (build), the M candidates per row
(candidates) and the FAISS index over the cache's pooled teacher vectors with the hard-negative search (search).
It imports pipeline.core and pipeline.cache only (the file format it writes lives in
pipeline.cache.negatives_file), never pipeline.teacher or pipeline.student."""
