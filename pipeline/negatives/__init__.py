"""build-negatives, cache -> negatives file: the FAISS index over the cache's pooled teacher vectors
and the candidate search (build). It imports pipeline.core and pipeline.cache only (the file format it writes lives in
pipeline.cache.negatives_file), never pipeline.teacher or pipeline.student."""
