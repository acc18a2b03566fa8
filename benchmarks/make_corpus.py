"""Write the unlabeled corpus for general distillation: the sentences of the GLUE train splits in
glue_data/ (CoLA, SST-2, MRPC, STS-B, WNLI; both sides of pairs; labels ignored) and of the QNLI test
split, deduplicated, one per line. Never a dev split: dev is what the students are scored on.

    python benchmarks/make_corpus.py --data-dir ../shared/glue_data --output data/corpus/glue.txt
    lrc extract-teacher --corpus data/corpus/glue.txt -o data/cache-general

Any other corpus works the same way: a text file with one passage per line (e.g. Wikipedia paragraphs),
or, online, a dataset name: `lrc extract-teacher --corpus wikimedia/wikipedia --corpus-config 20231101.en
--max-passages 1000000 -o data/cache-wiki`.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path

from pipeline.core import atomic
from pipeline.core.runtime import setup_logging
from pipeline.teacher.corpus import glue_sentences

log = logging.getLogger("make_corpus")


def write_corpus(data_dir: Path, output: Path, max_sentences: int | None, seed: int) -> dict[str, int]:
    """Write the (optionally subsampled, seeded, file order kept) sentences atomically; returns counts."""
    sentences = glue_sentences(data_dir)
    total = len(sentences)
    if max_sentences is not None and max_sentences < total:
        keep = sorted(random.Random(seed).sample(range(total), max_sentences))
        sentences = [sentences[i] for i in keep]
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(output, "".join(s + "\n" for s in sentences))
    return {"distinct_sentences": total, "written": len(sentences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LRC_DATA_DIR", "../shared/glue_data")))
    parser.add_argument("--output", type=Path, default=Path("data/corpus/glue.txt"))
    parser.add_argument("--max-sentences", type=int, default=0, help="a seeded random subset of this size (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_logging()
    counts = write_corpus(args.data_dir, args.output, args.max_sentences or None, args.seed)
    log.info("%d of %d distinct sentences written to %s", counts["written"], counts["distinct_sentences"], args.output)


if __name__ == "__main__":
    main()
