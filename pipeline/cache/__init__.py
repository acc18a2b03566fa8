"""The contract between the stages: the cache's Arrow schema, shard writer and checksums (format), its manifest
(manifest), the checks at open (verify), opening and reading a cache (reader), its description for inspect-cache
(describe), its int8 storage (quant), the importance scores recorded beside it (importance) and the negatives file
derived from it (negatives_file). Stage one writes through it, build-negatives and stage two read through it; it
imports pipeline.core only, never a stage."""
