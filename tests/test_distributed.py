"""Several processes under torchrun (pipeline/core/distributed.py): real `torch.distributed` processes (gloo, 2 ranks on
the CPU) started by torchrun through the real CLI, checked against one process. Each test names the bug it catches.

The torchrun launches dominate the time (each imports torch and transformers in three processes on a busy 2-core
machine, ~30 s), so there are seven: a 2-rank extraction, an uninterrupted 2-rank training, the same run failing on
rank 1 mid-run, and its --resume; then general distillation on 3 ranks with dropout on (3 ranks, so that two ranks
other than rank 0 can be compared), uninterrupted, failing on rank 1 and resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, ArrowRows, make_tiny_teacher, sst2_lines, write_tsv
from pipeline.cache.reader import open_cache
from pipeline.core import distributed
from pipeline.core.config import DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.negatives_config import NegativesConfig
from pipeline.core.teacher_config import ExtractConfig
from pipeline.core.train_config import TrainConfig
from pipeline.negatives.build import build_negatives
from pipeline.student.objective import loss_weights
from pipeline.student.run import setup_run
from pipeline.student.state_file import read_state
from pipeline.student.step import Trainable, train_step
from pipeline.student.train import epoch_batches, train_student
from pipeline.teacher.extract import extract_teacher

pytestmark = pytest.mark.slow  # real process groups (torchrun launches, gloo ranks) throughout

LAUNCH_TIMEOUT = 240  # a hang shows up as a timeout, not as a stuck test run

# Runs the real CLI; on rank FAIL_RANK it fails at the FAIL_AT-th optimizer step (after step FAIL_AT - 1), each
# rank that assembles a manifest appends its rank to MANIFEST_WRITERS, and with RNG_AT_START each rank writes the hash
# of its torch generator state after setup to RNG_AT_START.<rank>.
ENTRY = '''
import os, sys
import pipeline.cache.manifest as cache_manifest
import pipeline.student.train as train
from pipeline.core.errors import LrcError
assemble = cache_manifest.assemble_manifest
def recorded(*args, **kwargs):
    with open(os.environ["MANIFEST_WRITERS"], "a") as f:
        f.write(os.environ["RANK"] + " ")
    return assemble(*args, **kwargs)
if "MANIFEST_WRITERS" in os.environ:
    cache_manifest.assemble_manifest = recorded
real, calls = train.apply_update, [0]
def failing(*args, **kwargs):
    calls[0] += 1
    if os.environ["RANK"] == os.environ.get("FAIL_RANK", "1") and str(calls[0]) == os.environ.get("FAIL_AT"):
        raise LrcError("injected failure on this rank")
    return real(*args, **kwargs)
train.apply_update = failing
setup = train.setup_run
def recording(*args, **kwargs):  # each rank's generator as training starts: what its dropout masks are drawn from
    run = setup(*args, **kwargs)
    if "RNG_AT_START" in os.environ:
        import hashlib, torch
        with open(os.environ["RNG_AT_START"] + "." + os.environ["RANK"], "w") as f:
            f.write(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
    return run
train.setup_run = recording
from cli import app
app(sys.argv[1:], prog_name="lrc")
'''


def torchrun(*args: str, env: dict[str, str] | None = None, ranks: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO),
                   **(env or {})}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def lines(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def why(result: subprocess.CompletedProcess) -> str:
    """The error lines first (lrc's, or an exception's under its rank's traceback: torchrun's own traceback would push
    them out of a tail), then the tail."""
    errors = [line[:600] for line in lines(result.stderr) if "error: " in line.lower()]
    return "\n".join(errors[:3] + [result.stderr[-1500:]])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, glue_dir: Path) -> dict[str, Path]:
    """A dropout-free tiny teacher (so training is deterministic), 64 SST-2 train and 16 dev rows, the 1-rank
    cache of them (shards of 8) with negatives (K = 2), and the entry script."""
    root = tmp_path_factory.mktemp("ddp")
    teacher = make_tiny_teacher(root / "teacher", minilm_dir, layers=2, dropout=0.0)
    train = write_tsv(root / "train.tsv", sst2_lines(glue_dir, "train", 300, 64))
    dev = write_tsv(root / "dev.tsv", sst2_lines(glue_dir, "dev", 0, 16))
    data = DataConfig(task="sst2", train_file=train, dev_file=dev)
    extract_teacher(ExtractConfig(teacher=teacher, data=data, output_dir=root / "cache1", student_layers=2,
                                  shard_rows=8, device="cpu"))
    build_negatives(NegativesConfig(cache_dir=root / "cache1", k=2))
    (root / "entry.py").write_text(ENTRY)
    return {"root": root, "teacher": teacher, "train": train, "dev": dev, "cache": root / "cache1",
            "entry": root / "entry.py"}


def student_args(cache: Path, out: Path) -> list[str]:
    # Perturbation on (the paper's eps 1.0; the default is off), COS-NCE with K = 2 negatives, both stages (4 + 2).
    return ["train-student", "--cache", str(cache), "-o", str(out), "--layers", "2", "--hidden", "16", "--heads", "2",
            "--perturb-eps", "1.0",
            "--intermediate", "32", "--k", "2", "--max-steps", "6", "--batch-size", "8", "--device", "cpu",
            "--checkpoint-every", "2", "--log-every", "1", "--keep", "last", "--warmup-ratio", "0"]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    state = read_state(out / "checkpoint" / "state.safetensors")
    return {**{f"student.{k}": v for k, v in state["student"].items()},
            **{f"projections.{k}": v for k, v in state["projections"].items()}}


@pytest.fixture(scope="module")
def two_rank_run(work: dict[str, Path]) -> Path:
    """An uninterrupted 2-rank training through torchrun and the real CLI."""
    out = work["root"] / "two-ranks"
    result = torchrun(str(work["entry"]), *student_args(work["cache"], out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# --------------------------------------------------------------------------- extraction


def test_two_rank_extraction_writes_the_one_rank_cache(work: dict[str, Path]) -> None:
    """Catches: ranks writing overlapping or rank-dependent shards, rank 1 (or both) writing the manifest, rank 0
    assembling it before the other rank's shards are on disk (an incomplete-cache error), a rank's rows missing,
    importance scores of one rank's rows only."""
    out, writers = work["root"] / "cache2", work["root"] / "manifest-writers.txt"
    result = torchrun(str(work["entry"]), "extract-teacher", "--teacher", str(work["teacher"]), "--task", "sst2",
                      "-o", str(out), "--train-file", str(work["train"]), "--dev-file", str(work["dev"]),
                      "--student-layers", "2", "--shard-rows", "8", "--device", "cpu",
                      env={"MANIFEST_WRITERS": str(writers)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert writers.read_text().split() == ["0"]
    assert sum("cache:" in line for line in lines(result.stdout)) == 1  # the result line once (rank 0), not per rank
    one, two = open_cache(work["cache"], "full"), open_cache(out, "full")  # every shard against its sha256
    assert two.fingerprint == one.fingerprint
    # importance scores: each rank's shard sums, added in shard order by rank 0, are the one-process scores
    assert two.manifest["importance"] == one.manifest["importance"]
    assert (out / "importance.npz").read_bytes() == (work["cache"] / "importance.npz").read_bytes()
    for split in ("train", "dev"):
        assert [(s["file"], s["sha256"]) for s in two.manifest["splits"][split]["shards"]] == \
               [(s["file"], s["sha256"]) for s in one.manifest["splits"][split]["shards"]]
    rows_one, rows_two = ArrowRows(work["cache"], "train"), ArrowRows(out, "train")
    for row in (0, 9, 63):  # rows of rank 0's and rank 1's shards
        a, b = rows_one.example(row), rows_two.example(row)
        assert a["row_id"] == b["row_id"] == row and (a["input_ids"] == b["input_ids"]).all()
        assert (a["logits"] == b["logits"]).all() and all((a["hidden"][j] == b["hidden"][j]).all() for j in a["hidden"])
    assert not list((out / "shards").glob(".*"))  # no temp file left by either rank


# --------------------------------------------------------------------------- training


def test_two_ranks_of_half_batches_train_as_one_rank_of_the_whole(work: dict[str, Path], two_rank_run: Path,
                                                                  tmp_path: Path) -> None:
    """--batch-size 8 on 2 ranks (4 rows each) ends with the parameters of --batch-size 8 on one rank, perturbation on.
    Catches: the batch not split (each rank taking 8 rows), gradients summed instead of averaged, negatives drawn
    per rank, a perturbation normalised over the batch instead of per sample, the two halves not covering the
    one-rank batch, a second all-reduce (the perturbation's first pass) changing the update."""
    one = tmp_path / "one-rank"
    args = student_args(work["cache"], one)[1:]
    config = TrainConfig(cache_dir=work["cache"], output_dir=one, layers=2, hidden=16, heads=2, intermediate=32, k=2,
                         max_steps=6, batch_size=8, device="cpu", checkpoint_every=2, log_every=1, keep="last",
                         warmup_ratio=0.0, perturb_eps=1.0)
    assert "--batch-size" in args and "--perturb-eps" in args
    train_student(config)
    a, b = final_state(one), final_state(two_rank_run)
    assert a.keys() == b.keys()
    start = read_state(two_rank_run / "checkpoint" / "state.safetensors")["state"]
    assert start["step"] == 6
    assert_counts_every_ranks_rows(json.loads((two_rank_run / "training_summary.json").read_text()), 6 * 8)
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 2e-5, moved  # padding widths differ per half: float noise only
    # The log holds the whole batch's loss (the mean over ranks), as one process logs it.
    log1 = [json.loads(x) for x in (one / "train_log.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (two_rank_run / "train_log.jsonl").read_text().splitlines()]
    losses1, losses2 = [r["loss"] for r in log1 if "loss" in r], [r["loss"] for r in log2 if "loss" in r]
    assert losses2 == pytest.approx(losses1, abs=1e-4)


def test_a_failing_rank_ends_the_run_with_one_error_and_resume_matches(work: dict[str, Path], two_rank_run: Path
                                                                       ) -> None:
    """Rank 1 fails at step 3 (after the step-2 checkpoint); torchrun then kills rank 0 mid-run. Catches: a hang
    (the launch times out), several error lines or a traceback from lrc, rank 1 writing checkpoints, and a resume
    that does not continue the same run (per-rank data order, optimizer, schedule)."""
    out = work["root"] / "failed"
    failed = torchrun(str(work["entry"]), *student_args(work["cache"], out), env={"FAIL_AT": "3"})
    assert failed.returncode != 0
    # One error line (a progress bar may share its terminal line); rank 0 either says it stopped or is killed first.
    ours = [line[line.index("error: "):] for line in lines(failed.stderr) if "error: " in line]
    assert ours == ["error: injected failure on this rank"], failed.stderr[-3000:]
    assert all("stopped: rank 0 stopped because another rank failed" in line for line in lines(failed.stderr)
               if "stopped:" in line)
    assert "/pipeline/" not in failed.stderr and "cli.py" not in failed.stderr  # no lrc traceback (torchrun has its own)
    assert read_state(out / "checkpoint" / "state.safetensors")["state"]["step"] == 2

    resumed = torchrun(str(work["entry"]), *student_args(work["cache"], out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_state(two_rank_run), final_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- general distillation, dropout on

GENERAL_RANKS, GENERAL_STEPS, GENERAL_BATCH = 3, 4, 6  # 2 rows per rank; the corpus cache's 36 rows: full batches


@pytest.fixture(scope="module")
def corpus(work: dict[str, Path], corpus_cache: Path) -> Path:
    """The conftest corpus cache (a tiny encoder with dropout 0.1 over 36 windows of real SST-2 text) with negatives."""
    out = work["root"] / "corpus"
    shutil.copytree(corpus_cache, out)
    build_negatives(NegativesConfig(cache_dir=out, k=2))
    assert json.loads((corpus_cache / "teacher_weights" / "config.json").read_text())["hidden_dropout_prob"] > 0
    return out


def general_args(cache: Path, out: Path) -> list[str]:
    # The student inherits the encoder's dropout, so each rank's generator decides its masks.
    return ["train-student", "--cache", str(cache), "-o", str(out), "--layers", "2", "--hidden", "16", "--heads", "2",
            "--intermediate", "32", "--k", "2", "--max-steps", str(GENERAL_STEPS), "--batch-size", str(GENERAL_BATCH),
            "--device", "cpu", "--checkpoint-every", "2", "--log-every", "1", "--warmup-ratio", "0"]


@pytest.fixture(scope="module")
def general_run(work: dict[str, Path], corpus: Path) -> Path:
    """An uninterrupted 3-rank general distillation through torchrun and the real CLI."""
    out = work["root"] / "general"
    result = torchrun(str(work["entry"]), *general_args(corpus, out), ranks=GENERAL_RANKS,
                      env={"RNG_AT_START": str(work["root"] / "general-rng")})
    assert result.returncode == 0, why(result)
    return out


def assert_counts_every_ranks_rows(summary: dict, rows: int) -> None:
    """samples_per_s x train_seconds gives back the rows all ranks trained on, within what the two roundings
    (to 0.01 samples/s and 0.1 s) allow, so no timing tolerance is needed; one rank's rows fall outside (for any run
    longer than 0.1 s)."""
    rate, seconds = summary["samples_per_s"], summary["train_seconds"]
    assert (rate - 0.005) * (seconds - 0.05) <= rows <= (rate + 0.005) * (seconds + 0.05), (rate, seconds, rows)


def test_general_distillation_trains_on_three_ranks(work: dict[str, Path], general_run: Path) -> None:
    """Catches: DDP without its unused-parameter search (the training head never enters the loss of a corpus run:
    step 2 fails on every rank), ranks after rank 0 seeded alike (the same dropout masks on ranks 1 and 2), and
    samples/s counting one rank's rows."""
    summary = json.loads((general_run / "training_summary.json").read_text())
    assert summary["kind"] == "general" and summary["steps"] == GENERAL_STEPS
    assert summary["world_size"] == GENERAL_RANKS
    assert_counts_every_ranks_rows(summary, GENERAL_STEPS * GENERAL_BATCH)
    generators = [(work["root"] / f"general-rng.{rank}").read_text() for rank in range(GENERAL_RANKS)]
    assert len(set(generators)) == GENERAL_RANKS, generators  # a generator of its own per rank
    assert json.loads((general_run / "config.json").read_text())["architectures"] == ["BertModel"]


def test_a_killed_general_run_resumes_to_the_uninterrupted_one(work: dict[str, Path], corpus: Path,
                                                                general_run: Path) -> None:
    """Rank 1 fails at step 3 (after the step-2 checkpoint), then --resume on 3 ranks, dropout on. Catches: a rank
    resuming from another rank's generator (e.g. every rank from rank 0's): its dropout masks, so the weights,
    then differ from the uninterrupted run's."""
    out = work["root"] / "general-failed"
    failed = torchrun(str(work["entry"]), *general_args(corpus, out), ranks=GENERAL_RANKS, env={"FAIL_AT": "3"})
    assert failed.returncode != 0 and "error: injected failure on this rank" in failed.stderr, why(failed)
    saved = read_state(out / "checkpoint" / "state.safetensors")
    assert saved["state"]["step"] == 2 and len(saved["rng_by_rank"]) == GENERAL_RANKS
    assert len({bytes(r["torch"].numpy()) for r in saved["rng_by_rank"]}) == GENERAL_RANKS

    resumed = torchrun(str(work["entry"]), *general_args(corpus, out), "--resume", ranks=GENERAL_RANKS)
    assert resumed.returncode == 0, why(resumed)
    a, b = final_state(general_run), final_state(out)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from the uninterrupted run's, e.g. {differ[:3]}"


# --------------------------------------------------------------------------- the perturbation under DDP (in-process)


@pytest.fixture()
def one_rank_group(tmp_path: Path):
    """A real gloo process group of one rank in this process: DDP's reducer and hooks run as with many."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("eps", [1.0, 0.0])
def test_a_perturbed_step_all_reduces_once_and_gives_the_plain_gradient(work: dict[str, Path], tmp_path: Path,
                                                                         one_rank_group: None, eps: float) -> None:
    """Catches: the perturbation's first pass running .backward() (its parameter gradients would be added and
    all-reduced too), the second pass bypassing DDP (no all-reduce: ranks drift apart), or an all-reduce per pass."""
    config = TrainConfig(cache_dir=work["cache"], output_dir=tmp_path / "run", layers=2, hidden=16, heads=2,
                         intermediate=32, k=2, batch_size=8, device="cpu", perturb_eps=eps)
    run = setup_run(config)
    batch = next(iter(epoch_batches(run, 0)))
    weights = loss_weights(5, 6, config)  # stage two: every loss term
    train_step(run.model, batch, weights, config, run.objective, torch.device("cpu"))
    plain = [p.grad.clone() for p in run.params]
    for p in run.params:
        p.grad = None

    calls: list[int] = []

    def count(state, bucket):  # the comm hook: one call per bucket per all-reduce round
        calls.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    run.model.synced = distributed.wrap(Trainable(run.model.student, run.model.projections), torch.device("cpu"))
    run.model.synced.register_comm_hook(None, count)
    train_step(run.model, batch, weights, config, run.objective, torch.device("cpu"))
    buckets = len(set(calls))
    assert buckets > 0 and len(calls) == buckets, calls  # every bucket exactly once: one all-reduce round
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(run.params, plain))


# --------------------------------------------------------------------------- the policy, without processes


def test_one_process_has_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: a process group (and its rendezvous) created for plain single-process use."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.session("cpu") as ranks:
        assert ranks == distributed.SINGLE and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.from_env() == distributed.SINGLE


def test_global_batch_must_split_evenly() -> None:
    assert distributed.per_rank_batch(distributed.Ranks(1, 4, 1), 16) == 4
    with pytest.raises(LrcError, match="does not split evenly over 3 processes"):
        distributed.per_rank_batch(distributed.Ranks(0, 3, 0), 16)


def test_more_local_ranks_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LrcError, match="local rank 1 has no GPU of its own"):
        distributed.device_for(distributed.Ranks(1, 2, 1), "cuda")


def test_world_size_without_rank_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(LrcError, match="RANK/LOCAL_RANK are missing"):
        distributed.from_env()


def test_world_size_without_a_rendezvous_is_one_line_and_does_not_wait_half_an_hour(tmp_path: Path) -> None:
    """WORLD_SIZE set by hand in one process: without MASTER_ADDR init_process_group raised a ValueError
    traceback; with an address but no peers the rank waited the collective timeout (30 minutes) before a
    DistStoreError traceback. Now: one line at once, or after the rendezvous timeout (a few minutes by default)."""
    import socket

    assert distributed.RENDEZVOUS_TIMEOUT.total_seconds() <= 5 * 60
    with socket.socket() as s:  # a free port nobody else joins at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    command = [sys.executable, "-m", "cli", "train-student", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "o"),
               "--device", "cpu"]
    for extra, needles in (({}, ["WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT are not", "torchrun"]),
                           ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LRC_DIST_RENDEZVOUS_TIMEOUT_S": "2"},
                            [f"could not meet the other ranks at 127.0.0.1:{port} within 2 s", "unset WORLD_SIZE"])):
        env = {**base, "WORLD_SIZE": "2", "RANK": "0", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **extra}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        errors = [line for line in lines(done.stderr) if line.startswith("error:")]
        assert done.returncode == 1 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
        assert all(n in errors[0] for n in needles), errors[0]
    assert not (tmp_path / "o").exists()
