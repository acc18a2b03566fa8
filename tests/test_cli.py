"""`lrc` command line: help, one-line errors with exit 1, and what inspect-cache reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import REPO, sst2_lines, write_tsv

COMMANDS = ["finetune-teacher", "extract-teacher", "inspect-cache", "build-negatives", "export"]
runner = CliRunner()


def lrc(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 1, exactly one `error:` line on stderr, no traceback; returns that line."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture()
def files(tmp_path: Path, glue_dir: Path) -> list[str]:
    train = write_tsv(tmp_path / "train.tsv", sst2_lines(glue_dir, "train", 100, 12))
    dev = write_tsv(tmp_path / "dev.tsv", sst2_lines(glue_dir, "dev", 100, 5))
    return ["--train-file", str(train), "--dev-file", str(dev), "--device", "cpu"]


# ---------------------------------------------------------------- help


def test_help() -> None:
    result = lrc("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command: str) -> None:
    result = lrc(command, "--help")
    assert result.exit_code == 0, result.output
    assert "--help" in result.stdout and "Usage" in result.stdout


def test_no_arguments_shows_help() -> None:
    result = lrc()
    assert "Usage" in result.output and result.exit_code in (0, 2)


# ---------------------------------------------------------------- errors: one line, exit 1


def test_extract_errors_are_one_line(tmp_path: Path, tiny_teacher: Path, files: list[str]) -> None:
    out = tmp_path / "out"
    base = ["extract-teacher", "--teacher", str(tiny_teacher), "--output-dir", str(out), *files]
    assert_one_line_error(lrc(*base, "--task", "sst3"), "unknown task 'sst3'")
    assert_one_line_error(lrc(*base, "--task", "sst2", "--layers", "2,x"), "--layers", "'2,x'")
    assert_one_line_error(lrc(*base, "--task", "sst2", "--layers", "2,9"), "[9]", "1..4")
    assert_one_line_error(lrc(*base, "--task", "sst2", "--layers", "0"), "1-based")
    assert_one_line_error(lrc(*base, "--task", "sst2", "--hidden-dtype", "bfloat16"), "--hidden-dtype")
    assert_one_line_error(lrc(*base, "--task", "stsb"), "predicts 2 labels")
    assert not out.exists()
    missing = ["extract-teacher", "--teacher", str(tmp_path / "none"), "--task", "sst2", "-o", str(out), *files]
    assert_one_line_error(lrc(*missing), "does not exist")


def test_finetune_errors_are_one_line(tmp_path: Path, files: list[str]) -> None:
    out = tmp_path / "t"
    assert_one_line_error(lrc("finetune-teacher", "--task", "nope", "-o", str(out), *files), "unknown task")
    assert_one_line_error(lrc("finetune-teacher", "--task", "sst2", "-o", str(out), "--epochs", "0", *files), "--epochs")
    assert not out.exists()


@pytest.mark.slow
def test_real_process_prints_exactly_one_stderr_line(tmp_path: Path) -> None:
    """The console entry point, not the test runner: stderr is that one line and nothing else."""
    cmd = [sys.executable, "-c", "from cli import app; app()", "inspect-cache", str(tmp_path / "missing")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cache dir ") and "does not exist" in lines[0], result.stderr


# ---------------------------------------------------------------- inspect-cache


def _shard_tokens(path: Path) -> int:
    with pa.memory_map(str(path)) as source:
        return sum(len(x) for x in pa.ipc.open_stream(source).read_all().column("input_ids").to_pylist())


def test_inspect_cache_reports_what_the_cache_holds(tiny_cache: Path, tiny_teacher: Path) -> None:
    result = lrc("inspect-cache", str(tiny_cache))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert str(tiny_teacher.resolve()) in text and "4 layers x 32" in text
    assert "sst2" in text and "2 labels" in text and "accuracy" in text
    assert "[2, 4] of 4" in text and "float16" in text and "width 32" in text
    # Sizes from the files on disk, not from the manifest.
    shards = {split: sorted((tiny_cache / "shards").glob(f"{split}-*.arrow")) for split in ("train", "dev")}
    sizes = {split: sum(p.stat().st_size for p in paths) for split, paths in shards.items()}
    rows = {"train": 200, "dev": 872}
    for split in ("train", "dev"):
        tokens = sum(_shard_tokens(p) for p in shards[split])
        assert f"{split:<5} {rows[split]} rows in {len(shards[split])} shard(s)" in text
        assert f"{sizes[split] / rows[split] / 1e3:.1f} KB/example" in text
        assert f"{tokens / rows[split]:.1f} tokens/example" in text
    assert f"total        {(sizes['train'] + sizes['dev']) / 1e6:.1f} MB" in text
    assert json.loads((tiny_cache / "manifest.json").read_text())["fingerprint"] in text
    assert "verify:" not in text

    verified = lrc("inspect-cache", str(tiny_cache), "--verify")
    assert verified.exit_code == 0 and "every shard matches its checksum" in verified.stdout


def test_inspect_cache_refuses_damaged_caches(tiny_cache: Path, tmp_path: Path) -> None:
    c = tmp_path / "c"
    shutil.copytree(tiny_cache, c)
    shard = sorted((c / "shards").glob("train-*.arrow"))[2]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    # same size: the default (quick) check samples the first 64 KiB, --verify hashes every byte
    assert_one_line_error(lrc("inspect-cache", str(c)), "does not match its sampled checksum", shard.name)
    assert_one_line_error(lrc("inspect-cache", str(c), "--verify"), "does not match its checksum", shard.name)

    manifest = json.loads((c / "manifest.json").read_text())
    (c / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    assert_one_line_error(lrc("inspect-cache", str(c)), "format version 99")
    (c / "manifest.json").unlink()
    assert_one_line_error(lrc("inspect-cache", str(c)), "incomplete")


# ---------------------------------------------------------------- the commands run end to end


def test_extract_teacher_layers_option(tmp_path: Path, tiny_teacher: Path, files: list[str]) -> None:
    for option, expected in (("2,3", [2, 3]), ("all", [1, 2, 3, 4]), ("3,1", [1, 3])):
        out = tmp_path / option.replace(",", "-")
        result = lrc("extract-teacher", "--teacher", str(tiny_teacher), "--task", "sst2", "-o", str(out),
                     "--layers", option, *files)
        assert result.exit_code == 0, result.output
        assert f"layers {expected}" in result.stdout and "train=12, dev=5" in result.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["layers"] == expected
        with pa.memory_map(str(out / manifest["splits"]["train"]["shards"][0]["file"])) as source:
            names = pa.ipc.open_stream(source).schema.names
        assert [n for n in names if n.startswith("hidden_")] == [f"hidden_{j}" for j in expected]
    default = tmp_path / "default"
    result = lrc("extract-teacher", "--teacher", str(tiny_teacher), "--task", "sst2", "-o", str(default),
                 "--student-layers", "2", *files)
    assert result.exit_code == 0 and json.loads((default / "manifest.json").read_text())["layers"] == [2, 4]


def test_finetune_teacher_command(tmp_path: Path, files: list[str], minilm_dir: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    backbone = tmp_path / "backbone"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(backbone)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(backbone)
    out = tmp_path / "teacher"
    args = ["finetune-teacher", "--task", "sst2", "-o", str(out), "--backbone", str(backbone), "--epochs", "1",
            "--max-length", "32", *files]
    result = lrc(*args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "teacher_info.json").read_text())
    assert result.stdout.startswith(f"teacher: {out}") and json.dumps(info["dev_metrics"]) in result.stdout
    assert info["settings"]["max_length"] == 32 and info["dev_examples"] == 5
    assert_one_line_error(lrc(*args, "--lr", "1e-3"), "other settings")


def test_bundled_backbone_resolves_to_minilm(minilm_dir: Path) -> None:
    from pipeline.core.config import BUNDLED_BACKBONE
    from pipeline.teacher.finetune import resolve_backbone

    assert Path(resolve_backbone(BUNDLED_BACKBONE)) == minilm_dir
    assert resolve_backbone("/some/dir") == "/some/dir"


# ---------------------------------------------------------------- one source for every default

# command -> the config dataclasses its options fill (the first one that has a field wins)
CONFIGS = {
    "finetune-teacher": ("FinetuneConfig", "DataConfig"), "extract-teacher": ("ExtractConfig", "DataConfig", "CorpusConfig"),
    "build-negatives": ("NegativesConfig",), "train-student": ("TrainConfig",),
    "evaluate": ("EvaluateConfig", "DataConfig"), "demo": ("DemoConfig",), "sweep": ("TrainConfig",),
    "export": ("ExportConfig",),
}
CLI_ONLY = {"config", "verbose", "verify", "grid", "set_", "shard", "base", "data_dir"}  # data_dir: $LRC_DATA_DIR


def _as_field_value(value, default):
    if isinstance(default, tuple) and isinstance(value, str):  # alpha:beta:gamma, or a comma-separated list
        parts = value.split(":") if ":" in value else value.split(",")
        return tuple(type(default[0])(x) for x in parts) if default else ()
    return value


def test_help_defaults_are_the_config_defaults() -> None:
    """A default changed in a config dataclass (pipeline/core/*config.py) reaches --help, and no command restates one
    of its own."""
    import typer.main
    from dataclasses import MISSING, fields

    from pipeline.core import apps_config, config, negatives_config, teacher_config, train_config

    group = typer.main.get_command(app)
    modules = (config, teacher_config, negatives_config, train_config, apps_config)
    checked = 0
    for command, class_names in CONFIGS.items():
        classes = [next(getattr(m, name) for m in modules if hasattr(m, name)) for name in class_names]
        for param in group.commands[command].params:
            if param.name in CLI_ONLY or param.required:
                continue
            name = param.name  # generated options are named as their fields
            owner = next((c for c in classes if name in {f.name for f in fields(c)}), None)
            assert owner is not None, f"{command} --{param.name} has a default but no config field holds it"
            field = next(f for f in fields(owner) if f.name == name)
            if field.default is MISSING and field.default_factory is MISSING:  # required in the config
                assert param.default is None, (command, param.name)  # the CLI's "not given"
                continue
            default = field.default if field.default is not MISSING else field.default_factory()
            assert _as_field_value(param.default, default) == default, (command, param.name, param.default, default)
            checked += 1
    assert checked > 60


def test_sweep_takes_a_config_file_like_every_command(tmp_path: Path) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text(f'cache = "{tmp_path / "no-cache"}"\noutput-dir = "{tmp_path / "out"}"\nshard = "1of2"\n')
    assert_one_line_error(lrc("sweep", "--config", str(config)), "--shard '1of2' is not I/N")
    config.write_text('learning-rate = 0.1\n')  # a train-student setting: it belongs in --base or --set
    result = lrc("sweep", "--config", str(config))
    assert result.exit_code == 2 and "unknown option(s) learning_rate" in result.output and "set" in result.output


def test_inspect_cache_verify_covers_the_tokenizer_weights_and_manifest(tiny_cache: Path, tmp_path: Path) -> None:
    """--verify hashed the shards only: a changed teacher weight, tokenizer file or task passed it."""
    c = tmp_path / "c"
    shutil.copytree(tiny_cache, c)
    weights = c / "teacher_weights" / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert_one_line_error(lrc("inspect-cache", str(c), "--verify"), "teacher_weights/model.safetensors",
                          "does not match its checksum")
    weights.write_bytes(original)
    vocab = c / "tokenizer" / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    assert_one_line_error(lrc("inspect-cache", str(c)), "tokenizer/tokenizer.json", "manifest says")
    shutil.rmtree(c / "tokenizer")
    shutil.copytree(tiny_cache / "tokenizer", c / "tokenizer")
    manifest = json.loads((c / "manifest.json").read_text())
    (c / "manifest.json").write_text(json.dumps(manifest | {"task": manifest["task"] | {"name": "cola"}}))
    assert_one_line_error(lrc("inspect-cache", str(c), "--verify"), "does not match its fingerprint")
    (c / "manifest.json").write_text(json.dumps(manifest))
    assert lrc("inspect-cache", str(c), "--verify").exit_code == 0


def test_an_existing_file_as_the_output_is_one_line(tiny_cache: Path, tiny_teacher: Path, glue_dir: Path,
                                                    tmp_path: Path) -> None:
    """Every command that writes a dir refuses a file there before any work, in one line, and leaves it as it was."""
    c = tmp_path / "cache"
    shutil.copytree(tiny_cache, c)
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    data = ["--task", "sst2", "--data-dir", str(glue_dir), "--max-train-examples", "8"]
    for args in (["finetune-teacher", *data, "-o", str(taken), "--device", "cpu"],
                 ["extract-teacher", "--teacher", str(tiny_teacher), *data, "-o", str(taken), "--device", "cpu"],
                 ["train-student", "--cache", str(c), "-o", str(taken), "--k", "0", "--device", "cpu"],
                 ["train-student", "--cache", str(c), "-o", str(taken), "--k", "0", "--device", "cpu", "--resume"],
                 ["sweep", "--cache", str(c), "-o", str(taken), "--set", "k=0"],
                 ["demo", "--data-dir", str(glue_dir), "--work-dir", str(taken)]):
        assert_one_line_error(lrc(*args), str(taken))
        assert taken.read_text() == "mine", args[0]
        # a file where a parent dir of the output belongs: an OSError (ENOTDIR) traceback from mkdir
        inside = str(taken / "sub")
        assert_one_line_error(lrc(*[inside if a == str(taken) else a for a in args]), str(taken))
        assert taken.read_text() == "mine", args[0]
