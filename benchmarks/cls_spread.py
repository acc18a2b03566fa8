"""How input-dependent is a model's last-layer [CLS] vector? A check for collapsed students.

For each model (a student run dir or a teacher dir) it prints, over the first N dev sentences, the mean
cosine between the [CLS] vectors of two different sentences (1.0 = the same vector for every input)
and the spread of the pooler output. A run dir is read at its last checkpoint, not its best student,
so a run that never left the majority class still shows what training did to it.

    python benchmarks/cls_spread.py --task sst2 --tokenizer CACHE/tokenizer TEACHER_DIR RUN_DIR...
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from pipeline.core.config import DataConfig
from pipeline.core.task_data import load_examples
from pipeline.student.run_dir import CHECKPOINT_DIR, STATE_FILE


def load(path: Path) -> BertForSequenceClassification:
    model = BertForSequenceClassification.from_pretrained(path)
    state = path / CHECKPOINT_DIR / STATE_FILE
    if state.is_file():  # a training run: its last step rather than its best dev checkpoint
        model.load_state_dict(torch.load(state, map_location="cpu", weights_only=False)["student"])
    return model.eval()


@torch.no_grad()
def spread(model: BertForSequenceClassification, batch: dict) -> tuple[float, float]:
    out = model(**batch, output_hidden_states=True)
    cls = torch.nn.functional.normalize(out.hidden_states[-1][:, 0], dim=-1)
    off_diagonal = ~torch.eye(len(cls), dtype=torch.bool)
    pooled = model.bert.pooler(out.hidden_states[-1])
    return (cls @ cls.T)[off_diagonal].mean().item(), pooled.std(0).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--tokenizer", type=Path, required=True, help="e.g. the cache's tokenizer/ dir")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LRC_DATA_DIR", "../shared/glue_data")))
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    dev = load_examples(DataConfig(task=args.task, data_dir=args.data_dir), "dev")
    texts = dev.text_a[: args.rows]
    pairs = dev.text_b[: args.rows] if dev.text_b else None
    batch = AutoTokenizer.from_pretrained(args.tokenizer)(texts, pairs, padding=True, truncation=True, max_length=64,
                                                          return_tensors="pt")
    print("| model | mean cos of two inputs' [CLS] | pooler std |\n|---|---:|---:|")
    for path in args.models:
        cos, std = spread(load(path), batch)
        print(f"| {path.name} | {cos:.3f} | {std:.4f} |")


if __name__ == "__main__":
    main()
