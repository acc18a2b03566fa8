"""pipeline/core/tasks.py, task_data.py and data_files.py: the task table, the real glue_data/ readers, explicit
files, errors."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from pipeline.core.config import DataConfig
from pipeline.core.errors import LrcError
from pipeline.core.task_data import Examples, load_examples
from pipeline.core.tasks import TASKS, get_task


def _glue_root() -> Path:
    env = os.environ.get("LRC_DATA_DIR")
    return Path(env) if env else Path(__file__).parents[1].parent / "shared" / "glue_data"


@pytest.fixture(scope="module")
def glue() -> Path:
    root = _glue_root()
    if not root.is_dir():
        pytest.skip(f"real GLUE data not found at {root} (set LRC_DATA_DIR to a glue_data/ folder)")
    return root


def _load(root: Path | None, task: str, split: str, **kwargs) -> Examples:
    return load_examples(DataConfig(task, data_dir=root, **kwargs), split)


@pytest.fixture(scope="module")
def sst2_train(glue: Path) -> Examples:
    return _load(glue, "sst2", "train")


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- the task table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias, key",
    [("SST-2", "sst2"), ("sst-2", "sst2"), ("sst2", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola"),
     ("mnli_mismatched", "mnli-mm"), ("mnli-mm", "mnli-mm"), ("MNLI", "mnli"), ("mnli_matched", "mnli")],
)
def test_get_task_accepts_common_spellings(alias: str, key: str) -> None:
    assert get_task(alias).name == key


def test_get_task_unknown_lists_valid_names() -> None:
    with pytest.raises(LrcError, match="unknown task 'imdb'") as err:
        get_task("imdb")
    for name in TASKS:
        assert name in str(err.value)


def test_task_table_properties() -> None:
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli-mm", "qnli", "rte", "wnli"}
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    assert get_task("qnli").labels == get_task("rte").labels == ("entailment", "not_entailment")
    assert {TASKS[t].main_metric for t in ("cola", "sst2", "mrpc", "stsb")} == {"mcc", "accuracy", "f1", "pearson"}
    mm = get_task("mnli-mm")
    assert (mm.glue_dir, mm.dev_file, mm.hf_config, mm.hf_dev_split) == (
        "MNLI", "dev_mismatched.tsv", "mnli", "validation_mismatched")


# ---- real glue_data/ files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, split, rows, pair",
    [("cola", "train", 8551, False), ("cola", "dev", 1043, False), ("sst2", "dev", 872, False),
     ("mrpc", "train", 3668, True), ("mrpc", "dev", 408, True), ("stsb", "train", 5749, True),
     ("stsb", "dev", 1500, True), ("wnli", "train", 635, True), ("wnli", "dev", 71, True),
     ("qnli", "dev", 5463, True)],
)
def test_real_split_row_counts(glue: Path, task: str, split: str, rows: int, pair: bool) -> None:
    examples = _load(glue, task, split)
    assert len(examples) == len(examples.labels) == rows
    assert (examples.text_b is not None) == pair
    if pair:
        assert len(examples.text_b) == rows


def test_real_sst2_train(sst2_train: Examples) -> None:
    assert len(sst2_train) == 67349 and sst2_train.text_b is None
    assert sst2_train.text_a[0] == "hide new secretions from the parental units "  # trailing space is in the file
    assert sst2_train.text_a[-1] == (
        "this new jangle of noise , mayhem and stupidity must be a serious contender for the title . ")
    assert set(sst2_train.labels) == {0, 1}


def test_real_label_counts(glue: Path) -> None:
    # Counted with awk on the files, independently of the reader.
    assert Counter(_load(glue, "cola", "dev").labels) == {1: 721, 0: 322}
    assert Counter(_load(glue, "sst2", "dev").labels) == {1: 444, 0: 428}
    assert Counter(_load(glue, "mrpc", "dev").labels) == {1: 279, 0: 129}
    assert Counter(_load(glue, "qnli", "dev").labels) == {1: 2761, 0: 2702}  # not_entailment = 1
    scores = _load(glue, "stsb", "dev").labels
    assert sum(scores) == pytest.approx(3545.86) and min(scores) == 0.0 and max(scores) == 5.0


def test_real_cola_headerless_and_no_final_newline(glue: Path) -> None:
    train, dev = _load(glue, "cola", "train"), _load(glue, "cola", "dev")
    assert train.text_a[0] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert train.labels[0] == 1
    assert dev.text_a[0] == "The sailors rode the breeze clear of the rocks."
    assert dev.text_a[-1] == "John talked to Bill about himself."  # the line without a newline


def test_real_mrpc_bom_and_quotes(glue: Path) -> None:
    train, dev = _load(glue, "mrpc", "train"), _load(glue, "mrpc", "dev")
    assert train.text_a[0].startswith('Amrozi accused his brother , whom he called " the witness " , of')
    assert train.labels[:2] == [1, 0]
    # A sentence that starts with a double quote is read intact (default CSV quoting would eat it).
    assert dev.text_b[0] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert dev.text_b[1] == (
        'His wife said he was " 100 percent behind George Bush " and looked forward to using his years '
        "of training in the war .")


def test_real_stsb_and_qnli_first_rows(glue: Path) -> None:
    stsb = _load(glue, "stsb", "train")
    assert (stsb.text_a[0], stsb.text_b[0], stsb.labels[0]) == (
        "A plane is taking off.", "An air plane is taking off.", 5.0)
    assert stsb.labels[1] == pytest.approx(3.8)
    qnli = _load(glue, "qnli", "dev")
    assert qnli.text_a[0] == "What came into force after the new constitution was herald?"
    assert qnli.labels[:2] == [0, 1]
    assert qnli.text_b[658] == (
        '" This term describes cells with low levels of a cell-surface marker called MHC I (major '
        "histocompatibility complex) \u2013 a situation that can arise in viral infections of host cells.")


def test_real_data_root_missing_task_file(glue: Path) -> None:
    with pytest.raises(LrcError, match=r"QNLI/train\.tsv.*--data-dir.*LRC_DATA_DIR"):
        _load(glue, "qnli", "train")


# ---- subsampling ------------------------------------------------------------------------------------


def test_subsample_deterministic_and_order_preserving(sst2_train: Examples, glue: Path) -> None:
    a = _load(glue, "sst2", "train", max_train_examples=500, subsample_seed=7)
    b = _load(glue, "sst2", "train", max_train_examples=500, subsample_seed=7)
    c = _load(glue, "sst2", "train", max_train_examples=500, subsample_seed=8)
    assert a == b and a != c and len(a) == 500
    # Order preserved: the subset is a subsequence of the full split (texts and labels together).
    full = list(zip(sst2_train.text_a, sst2_train.labels))
    sub = list(zip(a.text_a, a.labels))
    assert _is_subsequence(sub, full)
    assert not _is_subsequence(sub[::-1], full)  # the check itself can fail


def _is_subsequence(part: list, whole: list) -> bool:
    rest = iter(whole)
    return all(item in rest for item in part)  # `in` consumes the iterator up to the match


def test_subsample_keeps_pairs_aligned_and_dev_untouched(tmp_path: Path) -> None:
    names = ("entailment", "not_entailment")
    rows = [f"{i}\tfirst {i}\tsecond {i}\t{names[i % 2]}" for i in range(50)]
    _write(tmp_path / "RTE" / "train.tsv", ["index\tsentence1\tsentence2\tlabel", *rows])
    _write(tmp_path / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    sub = _load(tmp_path, "rte", "train", max_train_examples=10, subsample_seed=3)
    ids = [int(t.split()[1]) for t in sub.text_a]
    assert ids == sorted(random.Random(3).sample(range(50), 10))
    assert sub.text_b == [f"second {i}" for i in ids] and sub.labels == [i % 2 for i in ids]
    assert len(_load(tmp_path, "rte", "dev", max_train_examples=10)) == 1
    assert len(_load(tmp_path, "rte", "train", max_train_examples=999)) == 50  # larger than the split: all


# ---- MNLI / QQP / RTE in the standard GLUE layout (not on this machine) -----------------------------

_MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def test_mnli_layout(tmp_path: Path) -> None:
    parses = "\t".join(["( x )"] * 4)
    labels5 = "\t".join(["neutral"] * 5)
    _write(tmp_path / "MNLI" / "dev_matched.tsv", [
        _MNLI_HEAD,
        f"0\t1\t1n\tgov\t{parses}\t\"Quoted premise, here.\tA hypothesis.\t{labels5}\tneutral",
        f"1\t2\t2e\tgov\t{parses}\tPremise two.\tHyp two.\t{labels5}\tcontradiction",
    ])
    _write(tmp_path / "MNLI" / "dev_mismatched.tsv", [
        _MNLI_HEAD, f"0\t1\t1n\tgov\t{parses}\tMM premise.\tMM hyp.\t{labels5}\tentailment"])
    _write(tmp_path / "MNLI" / "train.tsv", [
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
        f"0\t1\t1e\tgov\t{parses}\tTrain premise.\tTrain hyp.\tentailment\tentailment"])
    dev = _load(tmp_path, "mnli", "dev")
    assert dev.text_a == ['"Quoted premise, here.', "Premise two."]
    assert dev.text_b == ["A hypothesis.", "Hyp two."] and dev.labels == [1, 2]
    mm = _load(tmp_path, "mnli-mm", "dev")
    assert (mm.text_a, mm.labels) == (["MM premise."], [0])
    assert _load(tmp_path, "mnli_mismatched", "train").text_a == ["Train premise."]


def test_qqp_and_rte_layouts(tmp_path: Path) -> None:
    _write(tmp_path / "QQP" / "dev.tsv", [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        '7\t1\t2\t"Why?" he asked\tWhy not?\t1', "8\t3\t4\tHow?\tWhen?\t0"])
    qqp = _load(tmp_path, "qqp", "dev")
    assert qqp.text_a == ['"Why?" he asked', "How?"] and qqp.text_b == ["Why not?", "When?"]
    assert qqp.labels == [1, 0]
    _write(tmp_path / "RTE" / "dev.tsv", [
        "index\tsentence1\tsentence2\tlabel", "0\tP1.\tH1.\tnot_entailment", "1\tP2.\tH2.\tentailment",
        ""])  # a trailing blank line carries no example
    rte = _load(tmp_path, "rte", "dev")
    assert (rte.text_a, rte.text_b, rte.labels) == (["P1.", "P2."], ["H1.", "H2."], [1, 0])


# ---- explicit files ---------------------------------------------------------------------------------


def test_generic_csv_with_quotes_and_label_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", ["text,other,y", '"Hello, world",x,entailment', "plain,y,2"])
    ex = _load(None, "mnli", "train", train_file=path, text_column="text", text_pair_column="other", label_column="y")
    assert ex.text_a == ["Hello, world", "plain"] and ex.text_b == ["x", "y"] and ex.labels == [0, 2]


def test_generic_tsv_defaults_to_canonical_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "dev.tsv", ["label\tsentence", '1\t"starts with a quote', "0\tno"])
    ex = _load(None, "sst2", "dev", dev_file=path)
    assert ex.text_a == ['"starts with a quote', "no"] and ex.text_b is None and ex.labels == [1, 0]


def test_generic_jsonl_pair_and_regression(tmp_path: Path) -> None:
    rows = [{"sentence1": "a", "sentence2": "b", "label": 4.5}, {"sentence1": "c", "sentence2": "d", "label": "1"}]
    path = _write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows])
    ex = _load(None, "stsb", "train", train_file=path)
    assert ex.text_a == ["a", "c"] and ex.text_b == ["b", "d"] and ex.labels == [4.5, 1.0]


def test_generic_parquet_int_labels(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"q": ["x?", "y?"], "s": ["x.", "y."], "lab": [1, 0]}), path)
    ex = _load(None, "qnli", "train", train_file=path, text_column="q", text_pair_column="s", label_column="lab")
    assert ex.text_a == ["x?", "y?"] and ex.text_b == ["x.", "y."] and ex.labels == [1, 0]


def test_explicit_file_for_one_split_only(tmp_path: Path, glue: Path) -> None:
    path = _write(tmp_path / "t.csv", ["sentence,label", "good,1"])
    assert len(_load(glue, "sst2", "train", train_file=path)) == 1
    assert len(_load(glue, "sst2", "dev", train_file=path)) == 872  # dev still from data_dir


# ---- errors -----------------------------------------------------------------------------------------


def test_error_missing_columns_lists_available(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.csv", ["text,y", "a,1"])
    with pytest.raises(LrcError, match=r"no column 'sentence' \(it has: text, y\).*--text-column"):
        _load(None, "sst2", "train", train_file=path)
    with pytest.raises(LrcError, match=r"no column 'label' \(it has: text, y\).*--label-column"):
        _load(None, "sst2", "train", train_file=path, text_column="text")


def test_error_glue_tsv_missing_column(tmp_path: Path) -> None:
    _write(tmp_path / "SST-2" / "dev.tsv", ["text\tlabel", "a\t1"])
    with pytest.raises(LrcError, match=r"dev\.tsv has no column 'sentence' \(it has: text, label\)"):
        _load(tmp_path, "sst2", "dev")


def test_error_label_outside_label_set(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.jsonl", ['{"sentence": "a", "label": 1}', '{"sentence": "b", "label": 5}'])
    with pytest.raises(LrcError, match=r"row 1: label 5 is not in sst2's label set \['0', '1'\]"):
        _load(None, "sst2", "train", train_file=path)
    _write(tmp_path / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment",
                                          "1\ta\tb\tneutral"])
    with pytest.raises(LrcError, match=r"dev\.tsv:3: label 'neutral' is not in rte's label set"):
        _load(tmp_path, "rte", "dev")
    bad_score = _write(tmp_path / "s.csv", ["sentence1,sentence2,label", "a,b,high"])
    with pytest.raises(LrcError, match=r"row 0: score 'high' is not a number"):
        _load(None, "stsb", "train", train_file=bad_score)


def test_error_empty_split(tmp_path: Path) -> None:
    _write(tmp_path / "WNLI" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel"])
    with pytest.raises(LrcError, match=r"the dev split of wnli .*WNLI/dev\.tsv.* is empty"):
        _load(tmp_path, "wnli", "dev")


def test_error_malformed_tsv_row(tmp_path: Path) -> None:
    _write(tmp_path / "WNLI" / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t1", "1\ta b\t1"])
    with pytest.raises(LrcError, match=r"WNLI/train\.tsv:3: malformed TSV row with 3 fields, expected 4"):
        _load(tmp_path, "wnli", "train")
    _write(tmp_path / "CoLA" / "dev.tsv", ["src\t1\t\tok", "src\t1\tonly three"])
    with pytest.raises(LrcError, match=r"CoLA/dev\.tsv:2: malformed TSV row with 3 fields, expected 4"):
        _load(tmp_path, "cola", "dev")


def test_error_missing_data_root_file(tmp_path: Path) -> None:
    with pytest.raises(LrcError, match=r"not found: .*SST-2/dev\.tsv: pass --data-dir \(or set LRC_DATA_DIR\)"):
        _load(tmp_path, "sst2", "dev")


def test_error_unknown_task_and_split_and_file_type(tmp_path: Path) -> None:
    with pytest.raises(LrcError, match="unknown task 'nope'"):
        _load(tmp_path, "nope", "dev")
    with pytest.raises(LrcError, match="unknown split 'test'"):
        _load(tmp_path, "sst2", "test")
    path = _write(tmp_path / "x.xlsx", ["a"])
    with pytest.raises(LrcError, match=r"unsupported data file type '\.xlsx'"):
        _load(None, "sst2", "train", train_file=path)


# ---- the hub ----------------------------------------------------------------------------------------


def test_hub_offline_fails_with_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets reads these at import time, so the already imported module is patched too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    with pytest.raises(LrcError, match=r"could not load nyu-mll/glue/sst2 \(validation\) from the hub.*"
                                       r"--data-dir or set LRC_DATA_DIR"):
        _load(None, "sst2", "dev")


def test_hub_rows_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"],
                                           "label": [2, 0], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ex = _load(None, "mnli-mm", "dev")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert (ex.text_a, ex.text_b, ex.labels) == (["p0", "p1"], ["h0", "h1"], [2, 0])


def test_error_non_finite_scores(tmp_path: Path) -> None:
    """float() reads "nan" and "inf": a NaN STS-B score used to reach every loss downstream."""
    _write(tmp_path / "STS-B" / "train.tsv", ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                                              "sentence2\tscore", "0\tg\tf\ty\t0\ts\ts\ta\tb\t3.5", "1\tg\tf\ty\t1\ts\ts\ta\tc\tnan"])
    with pytest.raises(LrcError, match=r"STS-B/train\.tsv:3: score 'nan' is not a finite number"):
        _load(tmp_path, "stsb", "train")
    path = _write(tmp_path / "s.jsonl", ['{"sentence1": "a", "sentence2": "b", "label": 1.0}',
                                         '{"sentence1": "a", "sentence2": "b", "label": Infinity}'])
    with pytest.raises(LrcError, match=r"row 1: score inf is not a finite number"):
        _load(None, "stsb", "train", train_file=path)


def test_error_scores_outside_the_tasks_range(tmp_path: Path) -> None:
    """STS-B scores lie in [0, 5]: a 0..100 rescaled file or a wrong column used to train silently."""
    for score in ("5.5", "-1", "37"):
        path = _write(tmp_path / "s.jsonl", ['{"sentence1": "a", "sentence2": "b", "label": 0}',
                                             '{"sentence1": "a", "sentence2": "b", "label": 5.0}',
                                             f'{{"sentence1": "a", "sentence2": "b", "label": {score}}}'])
        with pytest.raises(LrcError, match=rf"row 2: score {score}(\.0)? is outside stsb's range \[0, 5\]") as err:
            _load(None, "stsb", "train", train_file=path)
        assert "\n" not in str(err.value)


def test_error_not_utf8_and_oversized_csv_field(tmp_path: Path) -> None:
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("sentence\tlabel\nun film très beau\t1\n".encode("latin-1"))
    with pytest.raises(LrcError, match=r"latin\.tsv: not UTF-8 text \(byte 0xe8 .*re-save it as UTF-8") as err:
        _load(None, "sst2", "train", train_file=latin)
    assert "\n" not in str(err.value)
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes('{"sentence": "très", "label": 1}\n'.encode("latin-1"))
    with pytest.raises(LrcError, match="not UTF-8"):
        _load(None, "sst2", "train", train_file=jsonl)
    huge = tmp_path / "huge.csv"
    huge.write_text('sentence,label\n"' + "word " * 40000 + '",1\n', encoding="utf-8")  # 200k characters
    with pytest.raises(LrcError, match=r"huge\.csv:\d+: field larger than field limit .*close the quote or shorten"):
        _load(None, "sst2", "train", train_file=huge)
    parquet = tmp_path / "cut.parquet"
    parquet.write_bytes(b"PAR1" + b"\0" * 50)
    with pytest.raises(LrcError, match=r"cut\.parquet: not a readable Parquet file"):
        _load(None, "sst2", "train", train_file=parquet)
    open_quote = tmp_path / "open.tsv"
    open_quote.write_text("sentence\tlabel\n" + "x" * 140000 + "\t1\n", encoding="utf-8")
    with pytest.raises(LrcError, match=r"open\.tsv:\d+: field larger than field limit"):
        _load(None, "sst2", "train", train_file=open_quote)
