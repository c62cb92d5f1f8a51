"""Evaluation problems from local files: JSONL/JSON, Parquet, Arrow, or a Hugging Face datasets directory.

Nothing is downloaded: ``eval.data_path`` names a file or a directory already on disk. A directory may be a
``save_to_disk`` dataset (``state.json`` + Arrow files), a ``DatasetDict`` (``dataset_dict.json`` + one
folder per split, chosen by ``eval.split``), or a hub snapshot of data files (those whose path mentions the
split are read; all of them when none does). Records need these fields:

    embedded:   question, answer                (eval.jsonl from ``generate_embedded``)
    math:       problem, and answer or solution (the gold is the solution's last \\boxed{...})
    gsm8k:      question, answer                (the gold follows "####")
    perplexity: text
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_bolt.eval.answers import extract_boxed, gsm8k_gold

log = logging.getLogger(__name__)

EXPECTED_KEYS = {
    "embedded": "'question' and 'answer'",
    "math": "'problem' and 'answer' (or 'solution' with a \\boxed{} answer)",
    "gsm8k": "'question' and 'answer' (ending in '#### NUMBER')",
    "perplexity": "'text'",
}
_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


class EvalDataError(ValueError):
    """Evaluation data that cannot be read; the message names the file and what it should hold."""


@dataclass(frozen=True)
class EvalItem:
    index: int
    problem: str
    gold: str


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all().to_pylist()  # what datasets' save_to_disk writes
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all().to_pylist()


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".arrow":
        return _read_arrow(path)
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path} is neither JSON lines nor a JSON array of records: {exc}") from None


def _directory_files(root: Path, split: str) -> list[Path]:
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise EvalDataError(f"{root} has splits {splits}, not eval.split={split!r}")
        root = root / split
    if (root / "state.json").is_file():
        return [root / f["filename"] for f in json.loads((root / "state.json").read_text())["_data_files"]]
    files = sorted(p for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise EvalDataError(f"{root} holds no {'/'.join(_SUFFIXES)} files")
    of_split = [p for p in files if any(part.startswith(split) for part in p.relative_to(root).parts)]
    return of_split or files


def read_records(path: Path, split: str = "test") -> list[dict[str, Any]]:
    """Every record of a file or directory, in order."""
    if not path.exists():
        raise EvalDataError(f"{path} does not exist (files are read locally, never downloaded)")
    files = _directory_files(path, split) if path.is_dir() else [path]
    if len(files) > 1 or files[0] != path:
        log.info("reading %s", ", ".join(str(f) for f in files))
    records = [rec for f in files for rec in _read_file(f)]
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise EvalDataError(f"{path}: record {bad} is not an object")
    return records


def _gold(task: str, rec: dict[str, Any]) -> str | None:
    if task == "math":
        if isinstance(rec.get("answer"), str) and rec["answer"].strip():
            return rec["answer"].strip()
        return extract_boxed(rec["solution"]) if isinstance(rec.get("solution"), str) else None
    if task == "gsm8k":
        return gsm8k_gold(rec["answer"]) if isinstance(rec.get("answer"), str) else None
    answer = rec.get("answer")
    return str(answer) if isinstance(answer, (str, int)) else None


def load_items(task: str, data_path: str | None, split: str = "test", limit: int | None = None) -> list[EvalItem]:
    """The first ``limit`` problems of ``task`` with their gold answers."""
    if not data_path:
        hint = " (the embedded corpus's eval.jsonl)" if task == "embedded" else ""
        raise EvalDataError(f"set eval.data_path to a local file or directory of {task} problems{hint}")
    path = Path(data_path)
    records = read_records(path, split)[:limit]
    if not records:
        raise EvalDataError(f"{path} holds no records")
    key = "problem" if task == "math" else "question"
    items = []
    for i, rec in enumerate(records):
        gold = _gold(task, rec)
        if not isinstance(rec.get(key), str) or gold is None:
            raise EvalDataError(f"{path}: record {i} does not fit the {task} task, which needs "
                                f"{EXPECTED_KEYS[task]}; found keys {sorted(rec)}")
        items.append(EvalItem(i, rec[key], gold))
    return items


def load_texts(data_path: str | None, split: str = "test", limit: int | None = None) -> list[str]:
    """Plain held-out texts for perplexity."""
    if not data_path:
        raise EvalDataError("set eval.data_path to a local file or directory of {text} records")
    path = Path(data_path)
    records = read_records(path, split)[:limit]
    if not records:
        raise EvalDataError(f"{path} holds no records")
    bad = next((i for i, r in enumerate(records) if not isinstance(r.get("text"), str)), None)
    if bad is not None:
        raise EvalDataError(f"{path}: record {bad} has no string 'text' (found keys {sorted(records[bad])}); "
                            f"perplexity needs {EXPECTED_KEYS['perplexity']}")
    return [r["text"] for r in records]
