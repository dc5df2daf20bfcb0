"""Offline workload kinds: reading, templating, the request format, answer/label parsing, scoring."""

from __future__ import annotations

import gzip
import json
import random
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from workloads.classify import UNPARSED, parse_label
from workloads.datasets import open_batches, read_table
from workloads.lengths import LengthDist
from workloads.mc_eval import extract_choice, gold_letter
from workloads.registry import (
    build_requests,
    kind_options,
    make_kind,
    sample_dataset,
    score,
    workload_names,
    write_jsonl,
)

DOCS = sample_dataset("summarize")
QUESTIONS = sample_dataset("mc_eval")
TICKETS = sample_dataset("classify")


def make_results(
    outputs: dict[str, str | None], finish: str = "stop", error_ids: tuple[str, ...] = ()
) -> pa.Table:
    """A results table as a job would export it: one row per custom_id."""
    ids = list(outputs)
    return pa.table(
        {
            "custom_id": ids,
            "prompt": ["p"] * len(ids),
            "text": [outputs[i] for i in ids],
            "finish_reason": [finish] * len(ids),
            "prompt_tokens": [10] * len(ids),
            "completion_tokens": [len((outputs[i] or "").split()) for i in ids],
            "error": ["boom" if i in error_ids else None for i in ids],
        }
    )


# ---- registry and request format -------------------------------------------------------------


def test_registry_names_and_options():
    assert workload_names() == ["summarize", "mc_eval", "classify", "synthetic"]
    assert {"column", "template", "max_tokens", "labels"} <= set(kind_options("classify"))
    with pytest.raises(ValueError, match="unknown workload 'translate'"):
        make_kind("translate")
    with pytest.raises(ValueError, match="no option colour"):
        make_kind("summarize", colour="red")
    with pytest.raises(ValueError, match="num_requests='many'"):
        make_kind("synthetic", num_requests="many")


def test_summarize_request_lines_are_exact_openai_batch_format():
    lines = list(build_requests("summarize", DOCS, model="tiny", column="text", max_tokens=64))
    first_doc = json.loads(DOCS.read_text().splitlines()[0])["text"]
    assert len(lines) == 20
    assert lines[0] == {
        "custom_id": "summarize-0",
        "method": "POST",
        "url": "/v1/completions",
        "body": {
            "model": "tiny",
            "prompt": f"Summarise the following document in a few sentences.\n\n{first_doc}\n\nSummary:",
            "max_tokens": 64,
            "temperature": 0,
        },
    }
    assert [line["custom_id"] for line in lines] == [f"summarize-{i}" for i in range(20)]


def test_chat_request_lines_use_messages():
    line = next(build_requests("classify", TICKETS, model="m", chat=True))
    assert line["url"] == "/v1/chat/completions"
    assert line["body"]["messages"][0]["role"] == "user"
    assert "Text: " in line["body"]["messages"][0]["content"]
    assert "prompt" not in line["body"]


def test_formats_and_small_batches_give_the_same_requests(tmp_path: Path):
    table = read_table(DOCS)
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=3)
    pa_csv.write_csv(table, tmp_path / "docs.csv")
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.write(DOCS.read_text())
    schema, batches = open_batches(tmp_path / "docs.parquet", batch_size=4)
    assert "text" in schema.names
    assert max(b.num_rows for b in batches) <= 4  # streamed, not loaded whole
    expected = list(build_requests("summarize", DOCS, model="m"))
    for name in ("docs.parquet", "docs.csv", "docs.jsonl.gz"):
        assert list(build_requests("summarize", tmp_path / name, model="m")) == expected, name
    assert write_jsonl(expected, tmp_path / "batch.jsonl") == 20
    assert json.loads((tmp_path / "batch.jsonl").read_text().splitlines()[3]) == expected[3]


def test_unknown_dataset_format_and_missing_file(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown dataset format"):
        build_requests("summarize", tmp_path / "docs.xlsx", model="m")
    with pytest.raises(FileNotFoundError):
        build_requests("summarize", tmp_path / "nope.csv", model="m")


# ---- templating ------------------------------------------------------------------------------


def test_missing_column_is_a_clear_error_before_any_request():
    with pytest.raises(ValueError, match=r"no column 'body'.*columns are: id, title, text"):
        build_requests("summarize", DOCS, model="m", column="body")


def test_template_with_unknown_field_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\{titel\} unknown"):
        build_requests("summarize", DOCS, model="m", template="{titel}\n{text}\nSummary:")
    with pytest.raises(ValueError, match="positional field"):
        build_requests("summarize", DOCS, model="m", template="Summarise: {}")
    with pytest.raises(ValueError, match="malformed prompt template"):
        build_requests("summarize", DOCS, model="m", template="Summarise {text")


def test_template_may_use_other_dataset_columns():
    line = next(build_requests("summarize", DOCS, model="m", template="# {title}\n{text}\nTL;DR:"))
    assert line["body"]["prompt"].startswith("# Riverside bike lane opens\nThe town of Millbrook")
    assert line["body"]["prompt"].endswith("TL;DR:")


# ---- multiple-choice eval --------------------------------------------------------------------

CHOICES = ["Berlin", "Paris", "Rome", "Madrid"]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "B"),
        (" b", "B"),
        ("(C) Rome", "C"),
        ("D. Madrid", "D"),
        ("Answer: b", "B"),
        ("I think the answer is (C).", "C"),
        ("The answer is D", "D"),
        ("Paris", "B"),
        ("It must be rome, surely", "C"),
        ("A city called Madrid", "D"),  # "A" as an article is not an answer
        ("A. Berlin", "A"),
        ("Well... I would go with C", "C"),
        ("the answer is a mystery", None),
        ("no idea", None),
        ("", None),
        ("E", None),  # not a letter of this question
    ],
)
def test_extract_choice(output: str, expected: str | None):
    assert extract_choice(output, CHOICES) == expected


def test_extract_choice_prefers_earliest_then_longest_choice_text():
    assert extract_choice("Rome, not Paris", CHOICES) == "C"
    assert extract_choice("new york city", ["York", "New York", "Boston"]) == "B"
    assert extract_choice("Boston", ["  ", "Boston"]) == "B"  # a blank choice matches nothing
    assert extract_choice("B", []) is None


def test_gold_letter_accepts_letters_indices_and_choice_text():
    assert gold_letter("c", CHOICES) == "C"
    assert gold_letter(1, CHOICES) == "B"  # 0-based, as in Hugging Face MMLU
    assert gold_letter("3", CHOICES) == "D"
    assert gold_letter(" madrid ", CHOICES) == "D"
    with pytest.raises(ValueError, match="neither a letter"):
        gold_letter("Lisbon", CHOICES)


def test_mc_prompt_lists_lettered_choices():
    line = next(build_requests("mc_eval", QUESTIONS, model="m"))
    assert (
        "What is the capital city of France?\nA. Berlin\nB. Madrid\nC. Paris\nD. Rome\nAnswer:"
        in (line["body"]["prompt"])
    )


def test_mc_accuracy_overall_and_per_subject():
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines()]
    outputs: dict[str, str | None] = {}
    for i, row in enumerate(rows):
        letter = row["answer"]
        wrong = "ABCD"[("ABCD".index(letter) + 1) % 4]
        # every geography answer right, as letters; math right as choice text; the rest wrong
        if row["subject"] == "geography":
            outputs[f"mc_eval-{i}"] = f"Answer: {letter}"
        elif row["subject"] == "math":
            outputs[f"mc_eval-{i}"] = row["choices"]["ABCD".index(letter)]
        else:
            outputs[f"mc_eval-{i}"] = wrong
    outputs["mc_eval-39"] = "I cannot say"  # general: unparsed counts as wrong
    table, summary = score("mc_eval", QUESTIONS, make_results(outputs))
    assert table.num_rows == 40
    assert summary["scored"] == 40
    assert summary["correct"] == 20
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["unparsed"] == 1
    assert summary["per_subject"]["geography"] == {"scored": 10, "accuracy": 1.0}
    assert summary["per_subject"]["math"]["accuracy"] == 1.0
    assert summary["per_subject"]["science"]["accuracy"] == 0.0
    assert table["correct"].to_pylist()[:2] == [True, True]
    assert table["predicted"].to_pylist()[39] is None


def test_mc_letter_columns_errors_and_missing_results_are_not_scored():
    dataset = pa.table(
        {
            "question": ["2+2?", "Sky colour?", "Opposite of up?"],
            "A": ["3", "green", "down"],
            "B": ["4", "blue", "left"],
            "C": ["5", "red", None],
            "answer": ["1", "B", "A"],  # "1": a 0-based index
        }
    )
    line = next(build_requests("mc_eval", dataset, model="m"))
    assert "A. 3\nB. 4\nC. 5\n" in line["body"]["prompt"]
    results = make_results({"mc_eval-0": "B", "mc_eval-1": "blue"}, error_ids=("mc_eval-1",))
    table, summary = score("mc_eval", dataset, results)
    assert table["status"].to_pylist() == ["ok", "error", "missing"]
    assert summary["scored"] == 1
    assert summary["accuracy"] == 1.0
    assert (summary["errors"], summary["missing"]) == (1, 1)
    assert "per_subject" not in summary


def test_mc_without_choices_or_gold_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the choices"):
        build_requests("mc_eval", pa.table({"question": ["q"], "answer": ["A"]}), model="m")
    no_gold = pa.table({"question": ["q"], "choices": [["x", "y"]]})
    assert len(list(build_requests("mc_eval", no_gold, model="m"))) == 1  # gold only needed to score
    with pytest.raises(ValueError, match="no column 'answer'"):
        score("mc_eval", no_gold, make_results({"mc_eval-0": "A"}))


# ---- classification --------------------------------------------------------------------------

LABELS = ("billing", "technical issue", "shipping", "account", "praise")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("billing", "billing"),
        ("  Shipping.", "shipping"),
        ("Label: TECHNICAL ISSUE", "technical issue"),
        ("account, or maybe billing", "account"),  # the first mentioned wins
        ("It is about billing, not the account", "billing"),
        ("accounting", UNPARSED),  # whole words only
        ("a technical question", UNPARSED),
        ("", UNPARSED),
    ],
)
def test_parse_label(output: str, expected: str):
    assert parse_label(output, LABELS) == expected


def test_parse_label_longest_wins_at_the_same_position():
    assert parse_label("very negative indeed", ["negative", "very negative", "positive"]) == "very negative"


def test_classify_infers_labels_and_reports_distribution_and_accuracy():
    gold = read_table(TICKETS)["label"].to_pylist()
    line = next(build_requests("classify", TICKETS, model="m"))
    assert "one of: account, billing, praise, shipping, technical issue." in line["body"]["prompt"]
    outputs = {f"classify-{i}": label.upper() for i, label in enumerate(gold)}
    first_billing = gold.index("billing")
    outputs[f"classify-{first_billing}"] = "shipping"  # one wrong
    outputs[f"classify-{gold.index('praise')}"] = "no idea"  # one unparsed
    table, summary = score("classify", TICKETS, make_results(outputs))
    assert summary["distribution"] == {
        "account": 12,
        "billing": 11,
        "praise": 11,
        "shipping": 13,
        "technical issue": 12,
        "unparsed": 1,
    }
    assert summary["unparsed"] == 1
    assert summary["accuracy"] == pytest.approx(58 / 60)
    assert table["predicted"][first_billing].as_py() == "shipping"
    assert table["correct"][first_billing].as_py() is False


def test_classify_labels_from_option_string_and_missing_labels_error():
    dataset = pa.table({"review": ["love it", "hate it"]})
    lines = list(build_requests("classify", dataset, model="m", column="review", labels="good, bad"))
    assert "one of: good, bad." in lines[0]["body"]["prompt"]
    _, summary = score("classify", dataset, make_results({"classify-0": "Good!", "classify-1": "meh"}),
                       column="review", labels=("good", "bad"))  # fmt: skip
    assert summary["distribution"] == {"good": 1, "bad": 0, "unparsed": 1}
    assert "accuracy" not in summary
    with pytest.raises(ValueError, match="classify needs labels"):
        build_requests("classify", dataset, model="m", column="review")


# ---- summarisation ---------------------------------------------------------------------------


def test_summarize_scoring_reports_lengths_and_truncation():
    outputs = {f"summarize-{i}": "A short summary of five." if i % 2 == 0 else "  " for i in range(20)}
    table, summary = score("summarize", DOCS, make_results(outputs, finish="length"))
    assert summary["ok"] == 20
    assert summary["truncated"] == 20
    assert summary["empty_summaries"] == 10
    assert summary["mean_summary_words"] == pytest.approx(2.5)
    assert summary["not_shorter"] == 0
    words = table["document_words"].to_pylist()
    assert all(120 < w < 260 for w in words)
    assert table["compression"][0].as_py() == pytest.approx(5 / words[0])
    assert table["summary"][1].as_py() == ""


# ---- synthetic -------------------------------------------------------------------------------


def test_synthetic_is_seeded_and_reproducible():
    def prompts(seed: int) -> list[str]:
        return [
            r["body"]["prompt"] for r in build_requests("synthetic", model="m", num_requests=5, seed=seed)
        ]

    assert prompts(1) == prompts(1)
    assert prompts(1) != prompts(2)
    with pytest.raises(ValueError, match="pass no dataset"):
        build_requests("synthetic", DOCS, model="m")


def test_synthetic_lengths_follow_the_requested_distributions():
    lines = list(
        build_requests(
            "synthetic",
            model="m",
            num_requests=4000,
            prompt_len="lognormal:200:0.5",
            output_len="uniform:10:30",
        )
    )
    prompt_words = [len(r["body"]["prompt"].split()) for r in lines]
    outputs = [r["body"]["max_tokens"] for r in lines]
    assert statistics.fmean(prompt_words) == pytest.approx(200, rel=0.05)
    assert statistics.pstdev(prompt_words) / statistics.fmean(prompt_words) == pytest.approx(0.5, rel=0.1)
    assert min(outputs) == 10 and max(outputs) == 30
    assert statistics.fmean(outputs) == pytest.approx(20, rel=0.05)
    fixed = list(build_requests("synthetic", model="m", num_requests=3, prompt_len="7", max_tokens=9))
    assert [len(r["body"]["prompt"].split()) for r in fixed] == [7, 7, 7]
    assert {r["body"]["max_tokens"] for r in fixed} == {9}


def test_synthetic_scoring_compares_tokens_with_targets():
    lines = list(
        build_requests("synthetic", model="m", num_requests=2, prompt_len="fixed:10", output_len="fixed:20")
    )
    results = pa.table(
        {
            "custom_id": ["synthetic-0", "synthetic-1"],
            "text": ["x", "y"],
            "prompt_tokens": [12, 12],
            "completion_tokens": [20, 10],
        }
    )
    table, summary = score(
        "synthetic", None, results, num_requests=2, prompt_len="fixed:10", output_len="fixed:20"
    )
    assert table["output_ratio"].to_pylist() == [1.0, 0.5]
    assert summary["mean_output_ratio"] == pytest.approx(0.75)
    assert summary["mean_prompt_ratio"] == pytest.approx(1.2)
    assert len(lines) == table.num_rows


def test_length_dist_parsing_and_bounds():
    rng = random.Random(0)
    assert str(LengthDist.parse("lognormal:512:1.0:4096")) == "lognormal:512:1:4096"
    capped = LengthDist.parse("lognormal:512:2:600")
    assert max(capped.sample(rng) for _ in range(2000)) == 600
    assert min(LengthDist.parse("lognormal:3:3").sample(rng) for _ in range(2000)) == 1
    for bad in ("gaussian:5", "uniform:5", "lognormal:a:b", "fixed:0"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_score_joins_on_a_custom_id_column_and_tolerates_large_strings():
    dataset = pa.table({"custom_id": ["summarize-1", "summarize-0"], "text": ["one two three four", "a b"]})
    results = make_results({"summarize-0": "a", "summarize-1": "one two"})
    results = results.set_column(0, "custom_id", results["custom_id"].cast(pa.large_string()))
    table, summary = score("summarize", dataset, results)
    assert table["custom_id"].to_pylist() == ["summarize-1", "summarize-0"]
    assert table["compression"].to_pylist() == [0.5, 0.5]
    assert json.loads(json.dumps(summary))["ok"] == 2
