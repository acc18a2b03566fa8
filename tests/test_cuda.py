"""The CUDA path, checked against the CPU: extraction, training steps (fp16 and int8 caches, file and in-batch
negatives), bf16 autocast, the pinned gather buffers, exact resume, DDP over nccl, and every stage command
with --device cuda. Marked `cuda`; skipped where no GPU is visible (CI has none: docs/PERFORMANCE.md records
the runs on a GPU machine).

Tolerances, and why: the CPU and the GPU sum in different orders, so a float32 forward differs in the last
bits (~1e-6 relative) and six AdamW steps carry that into the weights at ~1e-5. The bounds below are 10-100x
those and far below what a wrong device transfer, a missed dequantisation or a skipped loss term moves
(>= 1e-2 on these values).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, ArrowRows, make_tiny_teacher, sst2_lines, write_tsv, tiny_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]

# cuBLAS picks its workspace (and so its summation order) per handle; this fixed config plus
# torch.use_deterministic_algorithms makes two runs of the same steps on the GPU bitwise equal (resume test).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, glue_dir: Path) -> dict[str, Path]:
    """A dropout-free tiny teacher (so CPU and GPU runs can agree), 96 SST-2 train and 32 dev rows, extracted on
    the CPU as float16 and int8 caches, each with random negatives (K = 2); and a float16 cache of a teacher
    with dropout 0.1 (its students use the RNG)."""
    from pipeline.core.config import DataConfig
    from pipeline.core.negatives_config import NegativesConfig
    from pipeline.core.teacher_config import ExtractConfig
    from pipeline.negatives.build import build_negatives
    from pipeline.teacher.extract import extract_teacher

    root = tmp_path_factory.mktemp("cuda")
    teacher = make_tiny_teacher(root / "teacher", minilm_dir, layers=2, dropout=0.0)
    train = write_tsv(root / "train.tsv", sst2_lines(glue_dir, "train", 500, 96))
    dev = write_tsv(root / "dev.tsv", sst2_lines(glue_dir, "dev", 0, 32))
    data = DataConfig(task="sst2", train_file=train, dev_file=dev)
    paths = {"root": root, "teacher": teacher, "train": train, "dev": dev}
    for dtype in ("float16", "int8"):
        cache = root / f"cache-{dtype}"
        extract_teacher(ExtractConfig(teacher=teacher, data=data, output_dir=cache, student_layers=2, shard_rows=32,
                                      hidden_dtype=dtype, device="cpu"))
        build_negatives(NegativesConfig(cache_dir=cache, k=2))
        paths[dtype] = cache
    # a student inherits its teacher's dropout: this cache's students draw from the CUDA generator every step
    dropout_teacher = make_tiny_teacher(root / "teacher-dropout", minilm_dir, layers=2, dropout=0.1)
    extract_teacher(ExtractConfig(teacher=dropout_teacher, data=data, output_dir=root / "cache-dropout",
                                  student_layers=2, shard_rows=32, device="cpu"))
    build_negatives(NegativesConfig(cache_dir=root / "cache-dropout", k=2))
    paths["dropout"] = root / "cache-dropout"
    return paths


def tiny(cache: Path, out: Path, **kwargs):
    return tiny_config(cache, out, **{"max_steps": 6, "batch_size": 8, "keep": "last", "warmup_ratio": 0.0, **kwargs})


def final_state(out: Path) -> dict[str, torch.Tensor]:
    from pipeline.student.state_file import read_state

    state = read_state(out / "checkpoint" / "state.safetensors")
    return {**{f"student.{k}": v for k, v in state["student"].items()},
            **{f"projections.{k}": v for k, v in state["projections"].items()}}


def losses_of(out: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k in ("cos_nce", "soft", "hard", "loss", "stage")} for r in records
            if "loss" in r]


# --------------------------------------------------------------------------- extraction


def test_a_cache_extracted_on_cuda_matches_the_cpu_cache(work: dict[str, Path]) -> None:
    """Catches: hidden states or logits taken from the wrong layer, left on the device, or cast wrongly on the
    way off the GPU; a row order that depends on the device."""
    from pipeline.core.config import DataConfig
    from pipeline.core.teacher_config import ExtractConfig
    from pipeline.teacher.extract import extract_teacher

    out = work["root"] / "cache-cuda"
    data = DataConfig(task="sst2", train_file=work["train"], dev_file=work["dev"])
    extract_teacher(ExtractConfig(teacher=work["teacher"], data=data, output_dir=out, student_layers=2, shard_rows=32,
                                  device="cuda"))
    cpu, gpu = ArrowRows(work["float16"], "train"), ArrowRows(out, "train")
    for row in range(96):
        a, b = cpu.example(row), gpu.example(row)
        assert a["row_id"] == b["row_id"] and (a["input_ids"] == b["input_ids"]).all()
        torch.testing.assert_close(torch.from_numpy(b["logits"]), torch.from_numpy(a["logits"]), rtol=0, atol=1e-4)
        assert a["hidden"].keys() == b["hidden"].keys()
        for layer in a["hidden"]:  # float16 storage: 2^-11 relative, so the two roundings differ by a unit at most
            x, y = torch.from_numpy(a["hidden"][layer]).float(), torch.from_numpy(b["hidden"][layer]).float()
            torch.testing.assert_close(y, x, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- training steps


@pytest.mark.parametrize("dtype,source", [("float16", "file"), ("int8", "in-batch"), ("int8", "file")])
def test_training_steps_on_cuda_match_the_cpu(work: dict[str, Path], tmp_path: Path, dtype: str, source: str) -> None:
    """Six steps through both stages with perturbation on. Catches: int8 hidden states not dequantised (or
    dequantised with the wrong scales) on the device, in-batch negatives built differently on the GPU, a loss
    term or the perturbation skipped on CUDA, a batch moved to the device out of order."""
    from pipeline.student.train import train_student

    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        train_student(tiny(work[dtype], out, device=device, negatives_source=source))
        runs[device] = out
    cpu, gpu = losses_of(runs["cpu"]), losses_of(runs["cuda"])
    assert len(cpu) == len(gpu) == 6 and {r["stage"] for r in cpu} == {1, 2}
    for a, b in zip(cpu, gpu):
        assert a.keys() == b.keys()
        for term in a:
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-5), (term, a, b)
    a, b = final_state(runs["cpu"]), final_state(runs["cuda"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")


def test_bf16_autocast_trains_on_cuda(work: dict[str, Path], tmp_path: Path) -> None:
    """bf16 (8 bits of mantissa) cannot match fp32 closely, but its losses must track it: catches autocast
    left off (then they would be equal to the last bit) or a term computed in bf16 that should stay float32
    (COS-NCE's cosines then drift by far more than 2%)."""
    from pipeline.student.train import train_student

    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train_student(tiny(work["float16"], fp32, device="cuda"))
    train_student(tiny(work["float16"], bf16, device="cuda", precision="bf16"))
    a, b = losses_of(fp32), losses_of(bf16)
    assert a[0]["loss"] != b[0]["loss"]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-2), (x, y)


def test_the_data_path_pins_host_buffers_and_dequantises_on_the_device(work: dict[str, Path]) -> None:
    """Catches: unpinned blocks (every copy then synchronous), a non-blocking copy of a block the pool reuses
    before it landed, int8 dequantised on the host instead of the device."""
    from pipeline.student.batches import CacheDataset, EpochBatchSampler, make_loader, to_device
    from pipeline.student.sampler import NegativeSampler

    cache = work["int8"]
    manifest = json.loads((cache / "manifest.json").read_text())
    sampler = NegativeSampler(cache / "negatives.arrow", 2, 0, manifest["fingerprint"])
    dataset = CacheDataset(cache, "train", manifest["layers"], sampler)
    batches = EpochBatchSampler(len(dataset), 8, 0)
    batches.set_epoch(0)
    dataset.set_epoch(0)
    host = list(make_loader(dataset, batches, 0))
    assert host[0]["teacher_hidden"].dtype == torch.int8 and host[0]["teacher_hidden"].is_pinned()
    for batch in host:
        reference = to_device({k: v.clone() for k, v in batch.items()}, torch.device("cpu"))
        moved = to_device(batch, CUDA)
        assert moved["teacher_hidden"].device.type == "cuda" and moved["teacher_hidden"].dtype == torch.float32
        for key, value in reference.items():
            torch.testing.assert_close(moved[key].cpu(), value, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


# --------------------------------------------------------------------------- resume


def test_resume_on_cuda_is_exact(work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails after its step-4 checkpoint, resumed, ends bitwise where an uninterrupted run ends.
    Catches: the CUDA RNG state (dropout) not saved or not restored, optimizer state restored to the CPU, the
    data order or the negatives' draw not replayed."""
    import pipeline.student.train as train
    from pipeline.core.errors import LrcError

    torch.use_deterministic_algorithms(True)
    try:
        straight = tmp_path / "straight"
        train.train_student(tiny(work["dropout"], straight, device="cuda", max_steps=8))
        out = tmp_path / "resumed"
        real, calls = train.apply_update, [0]

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 6:
                raise LrcError("injected failure")
            return real(*args, **kwargs)

        monkeypatch.setattr(train, "apply_update", failing)
        with pytest.raises(LrcError, match="injected"):
            train.train_student(tiny(work["dropout"], out, device="cuda", max_steps=8))
        monkeypatch.setattr(train, "apply_update", real)
        train.train_student(tiny(work["dropout"], out, device="cuda", max_steps=8, resume=True))
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = final_state(straight), final_state(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses_of(straight) == losses_of(out)


# --------------------------------------------------------------------------- DDP over nccl and the commands


def run_cli(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "cli"] \
        if torchrun else [sys.executable, "-m", "cli"]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_ddp_over_nccl_trains_as_one_process(work: dict[str, Path], tmp_path: Path) -> None:
    """One rank under torchrun: a real nccl process group and DistributedDataParallel around the student.
    Catches: nccl not chosen for a CUDA device, the module not moved before wrapping, the perturbation's first
    pass inside DDP (which then errors or all-reduces twice), a rank's device not set."""
    from pipeline.student.train import train_student

    single = tmp_path / "single"
    train_student(tiny(work["float16"], single, device="cuda"))
    out = tmp_path / "ddp"
    result = run_cli("train-student", "--cache", str(work["float16"]), "-o", str(out), "--layers", "2", "--hidden", "16",
                     "--heads", "2", "--intermediate", "32", "--k", "2", "--max-steps", "6", "--batch-size", "8",
                     "--num-workers", "0", "--checkpoint-every", "2", "--log-every", "1", "--keep", "last",
                     "--warmup-ratio", "0", "--device", "cuda", "--perturb-eps", "1.0", torchrun=True)  # as tiny()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nccl" in result.stderr.lower() or "nccl" in result.stdout.lower(), result.stderr[-2000:]
    a, b = final_state(single), final_state(out)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_every_stage_command_runs_on_cuda(work: dict[str, Path], tmp_path: Path) -> None:
    """finetune-teacher, extract-teacher (int8), build-negatives, train-student (in-batch), evaluate and sweep
    through the real CLI with --device cuda. Catches: a stage that ignores --device or breaks on a CUDA tensor
    (numpy of a device tensor, a host/device mix in a metric)."""
    teacher, cache, student = tmp_path / "teacher", tmp_path / "cache", tmp_path / "student"
    data = ["--task", "sst2", "--train-file", str(work["train"]), "--dev-file", str(work["dev"])]
    steps = [
        ["finetune-teacher", "--backbone", str(work["teacher"]), *data, "--epochs", "1", "-o", str(teacher),
         "--device", "cuda"],
        ["extract-teacher", "--teacher", str(teacher), *data, "--student-layers", "2", "--hidden-dtype", "int8",
         "-o", str(cache), "--device", "cuda"],
        ["build-negatives", "--cache", str(cache), "--k", "2"],
        ["train-student", "--cache", str(cache), "-o", str(student), "--layers", "2", "--hidden", "16", "--heads", "2",
         "--intermediate", "32", "--k", "2", "--max-steps", "4", "--batch-size", "8", "--negatives-source", "in-batch",
         "--device", "cuda"],
        ["evaluate", str(student), "--task", "sst2", "--dev-file", str(work["dev"]), "--compare", str(teacher),
         "--device", "cuda", "--batch-size", "8", "--seq-length", "32"],
        ["sweep", "--cache", str(cache), "-o", str(tmp_path / "sweep"), "--set", "lr=1e-4,3e-4", "--set", "layers=2",
         "--set", "hidden=16", "--set", "heads=2", "--set", "intermediate=32", "--set", "k=2", "--set", "max-steps=2",
         "--set", "device=cuda"],
    ]
    for args in steps:
        result = run_cli(*args)
        assert result.returncode == 0, f"{args[0]}: {result.stderr[-3000:]}"
    assert json.loads((student / "training_summary.json").read_text())["device"].startswith("cuda:0 (")
    assert (tmp_path / "sweep" / "results.csv").read_text().count("\n") == 3  # header + two points
