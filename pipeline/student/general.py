"""General distillation (the paper's "LRC-BERT" row): `train-student` on a corpus cache.

The student learns the pre-trained encoder's intermediate layers on unlabeled windows with the
intermediate loss alone (COS-NCE, or hidden MSE), perturbed as configured. There are no labels, so
no dev evaluation: the last student is kept, saved as a bare encoder (AutoModel / BertModel format,
config and tokenizer) that `train-student --init DIR` starts task distillation from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import LrcError
from pipeline.core.train_config import TrainConfig
from pipeline.student import checkpoint
from pipeline.student.run_dir import RunDir
from pipeline.student.state_file import read_state, write_state

log = logging.getLogger(__name__)

# The training student is a sequence classifier like a task student (one code path for the loop and its
# checkpoints); its one-output head never enters the loss and is dropped when the encoder is saved.
HEAD: dict[str, Any] = {"labels": None, "num_labels": 1, "is_regression": True}
# L_total = L_intermediate throughout: no soft or hard loss exists without labels and logits.
WEIGHTS = (1.0, 0.0, 0.0)
# The general student's W_i, saved beside its encoder: they were trained with its layers against the
# pre-trained teacher's, so a task run that starts from it keeps them instead of a random map (with a
# random W_i the first hundred COS-NCE steps refit the map and pull the general layers towards it).
PROJECTIONS_FILE = "projections.safetensors"


def check_config(config: TrainConfig, cache_dir: Path) -> None:
    """Refuse what a corpus cache cannot train; say what is kept."""
    if config.intermediate_loss == "none":
        raise LrcError(f"cache {cache_dir} is a corpus cache (unlabeled text): general distillation trains the "
                       "intermediate loss alone, so --intermediate-loss none leaves nothing to learn: use cos_nce "
                       "or hidden_mse")
    log.info("general distillation on corpus cache %s: %s alone, no dev split, so the LAST student is kept "
             "and saved as an encoder for `train-student --init`", cache_dir, config.intermediate_loss)


def save_encoder(run_dir: RunDir, student: torch.nn.Module, tokenizer: Any,
                 projections: torch.nn.Module, layer_map: list[int]) -> None:
    """The student's encoder without its unused head, in the base model's format (e.g. BertModel), and
    its W_i (`PROJECTIONS_FILE`, with the teacher layers they map), which a task run started from it keeps."""
    encoder = student.base_model
    # The training head's label settings mean nothing for the encoder: leave a task loader its defaults.
    encoder.config.problem_type = None
    encoder.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}
    encoder.config.label2id = {"LABEL_0": 0, "LABEL_1": 1}
    checkpoint.save_student(run_dir, encoder, tokenizer)
    write_state(run_dir.output_dir / PROJECTIONS_FILE,
                           {"projections": projections.state_dict(), "layer_map": list(layer_map)})
    log.info("general student (encoder, config, tokenizer) written to %s: start task distillation with "
             "`lrc train-student --init %s`", run_dir.output_dir, run_dir.output_dir)


def load_projections(init: str, projections: torch.nn.Module, layer_map: list[int]) -> None:
    """W_i of the general student `init` into `projections` when it saved them for the same teacher layers
    and shapes (the teacher itself may differ: a task teacher fine-tuned from the general one is the case
    this is for). Anything else leaves them as they are, with a log line saying why."""
    path = Path(init) / PROJECTIONS_FILE
    if not path.is_file():  # random, teacher, or a general student saved before W_i were
        return
    saved = read_state(path)
    weights, own = saved["projections"], projections.state_dict()
    if saved["layer_map"] != layer_map or weights.keys() != own.keys() or any(weights[k].shape != v.shape
                                                                              for k, v in own.items()):
        log.info("%s holds W_i for teacher layers %s, this run maps %s with W_i of %s: they start at random",
                 path, saved["layer_map"], layer_map, tuple(next(iter(own.values())).shape))
        return
    projections.load_state_dict(weights)
    log.info("W_i start from the general student's (%s, teacher layers %s); --projection-init random to "
             "start them at random", path, layer_map)

