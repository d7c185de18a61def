"""High-throughput intervention sweeps: many (base, counterfactual, concept) triples.

    from hyperdas_fast.sweep import run_sweep, iter_sweep
    summary = run_sweep(records, "out.jsonl", intervene_fn=hd.intervene)

- ``records``: a list of dicts, a ``datasets.Dataset``, any iterable/generator of dicts,
  or the path of a JSONL file. Each record has ``base``, ``counterfactual`` and ``concept``
  strings (aliases: ``base_prompt``; ``counterfactual_prompt``/``source``; ``edit_instruction``)
  and optionally an ``id`` (str or int; default: the record's 0-based position, or for a
  JSONL file its 1-based line number). Ids must be unique; a repeated id is skipped, with a
  warning that names both places (a default id can repeat an explicit one: mix them with care).
  Give explicit ids if the input may be edited between a run and its resume (deleting
  a line shifts the default ids of the lines after it).
- Records are read in windows of ``sort_window``, sorted by length inside the window (so
  padding stays small) and cut into batches whose padded size, batch size x longest
  record in tokens, stays within ``batch_tokens`` (at most ``max_batch_size`` records).
- ``intervene_fn(bases, counterfactuals, concepts) -> list`` does one batch (default:
  ``HyperDAS.intervene`` of a checkpoint, loaded lazily). Its outputs must be JSON values.
- Results stream out (``iter_sweep`` yields them batch by batch) and, with ``output``,
  are appended to a JSONL file one batch at a time: the batch's complete lines in one
  write, then flush and fsync. On a restart the file is read back, a truncated last line
  (a kill during a write) is cut off, and ids already written are skipped, so an
  interrupted sweep resumes where it stopped and every id is written exactly once.
  Output lines are ``{"id", "base", "counterfactual", "concept", "output"}`` (plus the
  record's other fields) in processing order, not input order.
- Malformed input (a line that is not a JSON object, or lacks a field) is reported with
  its line number and skipped (``on_bad_line="skip"``) or stops the run
  (``on_bad_line="stop"``: the records read before it are finished and written first, then
  ValueError). Results already written are never lost.

CLI: ``hyperdas-fast intervene --input file.jsonl --output out.jsonl [--model-path CKPT]
[--batch-tokens N] [--on-bad-line skip|stop]`` -> ``main_intervene``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

FIELDS = ("base", "counterfactual", "concept")
ALIASES = {
    "base": ("base", "base_prompt"),
    "counterfactual": ("counterfactual", "counterfactual_prompt", "source", "cf"),
    "concept": ("concept", "edit_instruction"),
}
ON_BAD_LINE = ("skip", "stop")
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_SORT_WINDOW = 2048

InterveneFn = Callable[[List[str], List[str], List[str]], Sequence[Any]]


@dataclass
class BadRecord:
    """A malformed input record: where it is and why."""

    where: str  # "line 12" (JSONL file) or "record 12" (in-memory input)
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class SweepSummary:
    written: int = 0  # results written (or yielded) by this run
    already_done: int = 0  # ids found in the output and skipped
    done_for_other_records: int = 0  # of those, ids the output holds for another record (a changed input)
    duplicates: int = 0  # input records whose id appeared earlier in the input
    bad: List[BadRecord] = field(default_factory=list)
    batches: int = 0
    truncated_bytes: int = 0  # bytes of a partial last output line cut off on resume

    def as_dict(self) -> Dict[str, Any]:
        return {
            "written": self.written,
            "already_done": self.already_done,
            "done_for_other_records": self.done_for_other_records,
            "duplicates": self.duplicates,
            "bad_records": [str(b) for b in self.bad],
            "batches": self.batches,
            "truncated_bytes": self.truncated_bytes,
        }


# --------------------------------------------------------------------------- input


class Record(dict):
    """A normalised input record (written out as a plain JSON object), with where it came
    from ("line 7", "record 6") and whether its id is the default one (its position)."""

    where: str = ""
    default_id: bool = False


def _normalise(raw: Any, default_id: Any, where: str) -> Union[Dict[str, Any], BadRecord]:
    if not isinstance(raw, dict):
        return BadRecord(where, f"expected a JSON object with {', '.join(FIELDS)}, got {type(raw).__name__}")
    record = Record(raw)
    record.where, record.default_id = where, "id" not in raw
    for name, aliases in ALIASES.items():
        value = next((record[a] for a in aliases if a in record), None)
        if value is None:
            return BadRecord(where, f"missing field {name!r} (a string; aliases: {', '.join(aliases)})")
        if not isinstance(value, str):
            return BadRecord(where, f"field {name!r} must be a string, got {type(value).__name__}")
        used = next(a for a in aliases if a in record)
        record.pop(used)  # only the alias read: another one present is the record's own field
        record[name] = value
    if "output" in record:
        return BadRecord(where, "has a field 'output', which the sweep writes the result to: rename it")
    try:  # e.g. a lone surrogate ("\ud800"), valid JSON that cannot be written back as UTF-8
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return BadRecord(where, f"holds text that is not valid Unicode ({exc.reason})")
    rid = record.get("id", default_id)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return BadRecord(where, f"id must be a string or an integer, got {type(rid).__name__}")
    record["id"] = rid
    return record


def _read_jsonl(path: Path) -> Iterator[Union[Dict[str, Any], BadRecord]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield BadRecord(where, f"not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue  # blank lines are allowed
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield BadRecord(where, f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            yield _normalise(obj, number, where)


def iter_records(source) -> Iterator[Union[Dict[str, Any], BadRecord]]:
    """Normalised records (or BadRecord markers) from a path, a list, a Dataset or an iterable."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"input must be an existing JSONL file, got {str(path)!r}")
        yield from _read_jsonl(path)
        return
    if isinstance(source, dict):
        raise ValueError("records must be an iterable of dicts (a list, a datasets.Dataset or a generator), got one dict")
    try:
        iterator = iter(source)
    except TypeError:
        raise ValueError(f"records must be a path or an iterable of dicts, got {type(source).__name__}") from None
    for index, raw in enumerate(iterator):
        yield _normalise(raw, index, f"record {index}")


def _count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            count += chunk.count(b"\n")
    return count


def _total(source) -> Optional[int]:
    if isinstance(source, (str, os.PathLike)):
        try:
            return _count_lines(Path(source))
        except OSError:
            return None
    try:
        return len(source)
    except TypeError:
        return None


# --------------------------------------------------------------------------- output


def _id_key(rid: Any) -> str:
    return json.dumps(rid)


def _record_digest(record: Dict[str, Any]) -> str:
    """What a result was computed from: its base, counterfactual and concept."""
    return json.dumps([record.get("base"), record.get("counterfactual"), record.get("concept")], ensure_ascii=False)


def load_done_ids(output: Union[str, os.PathLike]) -> Tuple[Set[str], int]:
    """Ids already in ``output``; a truncated or unreadable last line is cut off.

    Returns (set of json-encoded ids, bytes truncated). Only the final line may be
    partial (a kill during a write); a bad line elsewhere is a ValueError: the file is
    not one this sweep wrote.
    """
    done, truncated = _load_done(output)
    return set(done), truncated


def _load_done(output: Union[str, os.PathLike]) -> Tuple[Dict[str, str], int]:
    """As load_done_ids, with each id's record digest (see _record_digest)."""
    path = Path(output)
    done: Dict[str, str] = {}
    if not path.exists():
        return done, 0
    with open(path, "rb") as handle:
        data = handle.read()
    good_end = 0
    position = 0
    truncated = 0
    while position < len(data):
        newline = data.find(b"\n", position)
        end = len(data) if newline < 0 else newline + 1
        line = data[position:end]
        is_last = end >= len(data)
        parsed = None
        if line.endswith(b"\n"):
            try:
                parsed = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                parsed = None
        if not isinstance(parsed, dict) or "id" not in parsed:
            if is_last:
                truncated = len(data) - position
                break
            if not line.strip():
                position = end
                good_end = end
                continue
            raise ValueError(
                f"output {str(path)!r} has an unreadable line at byte {position} that is not the last one; "
                "it was not written by this sweep (move it away or pick another --output)"
            )
        done[_id_key(parsed["id"])] = _record_digest(parsed)
        position = end
        good_end = end
    if truncated:
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
            handle.flush()
            os.fsync(handle.fileno())
    return done, truncated


class _Appender:
    """Appends whole lines with one write per batch, then flush + fsync."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # One sweep per output file: two would each read the done ids once and then write
        # every id twice (an advisory lock, held until close).
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        except OSError:
            os.close(self.fd)
            self.fd = -1
            raise RuntimeError(f"another sweep is writing {path}; wait for it or choose another --output") from None

    def write_lines(self, lines: List[str]) -> None:
        payload = "".join(line + "\n" for line in lines).encode("utf-8")
        view = memoryview(payload)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------- batching


def _char_length(record: Dict[str, Any]) -> int:
    # ~4 characters per token for English text; used when no tokenizer is given.
    return max(1, (len(record["base"]) + len(record["counterfactual"]) + len(record["concept"]) + 3) // 4)


def make_length_fn(tokenizer=None) -> Callable[[Dict[str, Any]], int]:
    """Record -> its token count (base + counterfactual + concept), via ``tokenizer`` if given."""
    if tokenizer is None:
        return _char_length

    def length(record: Dict[str, Any]) -> int:
        return sum(len(tokenizer(record[f]).input_ids) for f in FIELDS)

    return length


def plan_batches(
    records: Sequence[Dict[str, Any]],
    length_fn: Callable[[Dict[str, Any]], int],
    batch_tokens: int,
    max_batch_size: int,
) -> List[List[Dict[str, Any]]]:
    """Sort by length and cut into batches with size x longest length <= batch_tokens."""
    lengths = [length_fn(r) for r in records]
    order = sorted(range(len(records)), key=lambda i: lengths[i])
    batches: List[List[Dict[str, Any]]] = []
    current: List[Dict[str, Any]] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and ((len(current) + 1) * new_longest > batch_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(records[i])
        longest = new_longest
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------- the sweep


def _check_options(batch_tokens, max_batch_size, sort_window, on_bad_line) -> None:
    for name, value in (("batch_tokens", batch_tokens), ("max_batch_size", max_batch_size), ("sort_window", sort_window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")


def _report_bad(bad: BadRecord, label: str) -> None:
    print(f"warning: {label}{bad}: skipped", file=sys.stderr)


def iter_sweep(
    records,
    output: Optional[Union[str, os.PathLike]] = None,
    intervene_fn: Optional[InterveneFn] = None,
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    sort_window: int = DEFAULT_SORT_WINDOW,
    length_fn: Optional[Callable[[Dict[str, Any]], int]] = None,
    tokenizer=None,
    on_bad_line: str = "skip",
    progress: bool = True,
    summary: Optional[SweepSummary] = None,
) -> Iterator[Dict[str, Any]]:
    """Run the sweep, yielding each result dict as its batch completes (see module doc).

    ``summary`` (optional) is filled in as the sweep goes. The output file is written
    before a batch's results are yielded.
    """
    _check_options(batch_tokens, max_batch_size, sort_window, on_bad_line)
    if intervene_fn is None:
        intervene_fn = default_intervene_fn()
        tokenizer = tokenizer if tokenizer is not None else getattr(intervene_fn, "tokenizer", None)
    if not callable(intervene_fn):
        raise ValueError(f"intervene_fn must be callable (bases, counterfactuals, concepts) -> list, got {intervene_fn!r}")
    summary = summary if summary is not None else SweepSummary()
    length_fn = length_fn or make_length_fn(tokenizer)
    label = f"{os.fspath(records)}: " if isinstance(records, (str, os.PathLike)) else ""

    done: Dict[str, str] = {}
    appender = None
    if output is not None:
        appender = _Appender(Path(output))  # locked before the done ids are read
        done, summary.truncated_bytes = _load_done(output)
        if summary.truncated_bytes:
            print(f"warning: {os.fspath(output)}: cut off a partial last line "
                  f"({summary.truncated_bytes} bytes) from an interrupted run", file=sys.stderr)
    seen: Dict[str, str] = {}  # id -> where it was first read

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=_total(records), unit="ex", desc="intervene", dynamic_ncols=True)

    def run_window(window: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for batch in plan_batches(window, length_fn, batch_tokens, max_batch_size):
            outputs = intervene_fn([r["base"] for r in batch], [r["counterfactual"] for r in batch],
                                   [r["concept"] for r in batch])
            outputs = list(outputs)
            if len(outputs) != len(batch):
                raise ValueError(f"intervene_fn returned {len(outputs)} results for a batch of {len(batch)}")
            results = [dict(r, output=o) for r, o in zip(batch, outputs)]
            if appender is not None:
                appender.write_lines([json.dumps(r, ensure_ascii=False) for r in results])
            summary.batches += 1
            summary.written += len(results)
            if bar is not None:
                bar.update(len(results))
            yield from results

    try:
        window: List[Dict[str, Any]] = []
        for item in iter_records(records):
            if isinstance(item, BadRecord):
                summary.bad.append(item)
                if bar is not None:
                    bar.update(1)
                if on_bad_line == "stop":
                    yield from run_window(window)  # finish what was read before the bad line
                    window = []
                    raise ValueError(f"{label}{item} (on_bad_line='stop'; {summary.written} results written)")
                _report_bad(item, label)
                continue
            key = _id_key(item["id"])
            if key in seen:
                summary.duplicates += 1
                how = " (its default id: it has none)" if getattr(item, "default_id", False) else ""
                print(f"warning: {label}duplicate id {item['id']!r} at {getattr(item, 'where', '?')}{how}, first at "
                      f"{seen[key]}: skipped", file=sys.stderr)
                if bar is not None:
                    bar.update(1)
                continue
            seen[key] = getattr(item, "where", "?")
            if key in done:
                summary.already_done += 1
                if done[key] != _record_digest(item):
                    # the output was written from another input (default ids are positions)
                    summary.done_for_other_records += 1
                    if summary.done_for_other_records <= 3:
                        print(f"warning: {label}id {item['id']!r} at {getattr(item, 'where', '?')} is in "
                              f"{os.fspath(output)} for another record (base, counterfactual or concept differ): "
                              "skipped as done; give explicit ids, or another --output", file=sys.stderr)
                if bar is not None:
                    bar.update(1)
                continue
            window.append(item)
            if len(window) >= sort_window:
                yield from run_window(window)
                window = []
        yield from run_window(window)
    finally:
        if appender is not None:
            appender.close()
        if bar is not None:
            bar.close()


def run_sweep(records, output: Optional[Union[str, os.PathLike]] = None,
              intervene_fn: Optional[InterveneFn] = None, **kwargs) -> SweepSummary:
    """Run the whole sweep (writing ``output`` if given) and return its SweepSummary."""
    summary = kwargs.pop("summary", None) or SweepSummary()
    for _ in iter_sweep(records, output, intervene_fn, summary=summary, **kwargs):
        pass
    return summary


# --------------------------------------------------------------------------- default callable


def default_intervene_fn(model_path: Optional[str] = None, max_new_tokens: int = 8,
                         inference_mode: str = "default", **load_kwargs) -> InterveneFn:
    """``HyperDAS.intervene`` on lists, from a checkpoint (``HyperDAS.load``) or, with
    ``model_path=None``, an untrained HyperDAS on the embedded model (for smoke runs)."""
    from .models.hyperdas import HyperDAS  # heavy: imported only when used

    if model_path is None:
        print("warning: no --model-path: using an untrained HyperDAS on the embedded model "
              "(outputs are meaningless; for smoke runs)", file=sys.stderr)
        hd = HyperDAS(**load_kwargs)
    else:
        if not Path(model_path).exists():
            raise FileNotFoundError(f"--model-path must be a HyperDAS checkpoint folder, got {model_path!r}")
        hd = HyperDAS.load(model_path, **load_kwargs)

    def intervene(bases: List[str], counterfactuals: List[str], concepts: List[str]) -> List[str]:
        return list(hd.intervene(bases, counterfactuals, concepts, max_new_tokens=max_new_tokens,
                                 inference_mode=inference_mode))

    intervene.tokenizer = getattr(hd, "tokenizer", None)  # type: ignore[attr-defined]
    return intervene


# --------------------------------------------------------------------------- CLI


def add_intervene_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Attach the ``intervene`` options to ``parser`` (used by hyperdas_fast.cli)."""
    parser.add_argument("--input", required=True, help="JSONL file: one {base, counterfactual, concept[, id]} per line")
    parser.add_argument("--output", required=True, help="JSONL results file; an existing one is resumed")
    parser.add_argument("--model-path", default=None, help="HyperDAS checkpoint folder (default: untrained, for smoke runs)")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                        help=f"padded tokens per batch, batch size x longest record (default {DEFAULT_BATCH_TOKENS})")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help=f"records per batch at most (default {DEFAULT_MAX_BATCH_SIZE})")
    parser.add_argument("--sort-window", type=int, default=DEFAULT_SORT_WINDOW,
                        help=f"records read ahead and sorted by length (default {DEFAULT_SORT_WINDOW})")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per intervention (default 8)")
    parser.add_argument("--inference-mode", default="default", help="HyperDAS inference mode (default 'default')")
    parser.add_argument("--on-bad-line", choices=ON_BAD_LINE, default="skip",
                        help="a malformed input line: report it and skip it (default) or stop the run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main_intervene(args=None, intervene_fn: Optional[InterveneFn] = None) -> int:
    """``hyperdas-fast intervene``: ``args`` is an argparse.Namespace (from a parser given
    ``add_intervene_arguments``) or a list of command-line strings (None: sys.argv[1:]).
    Returns the exit status: 0 done, 1 stopped at a bad line, 2 bad arguments or files."""
    if not isinstance(args, argparse.Namespace):
        parser = add_intervene_arguments(argparse.ArgumentParser(
            prog="hyperdas-fast intervene", description="Run HyperDAS interventions over a JSONL file (resumable)."))
        args = parser.parse_args(args)
    try:
        if intervene_fn is None:
            max_new = getattr(args, "max_new_tokens", 8)
            if not isinstance(max_new, int) or max_new < 1:
                raise ValueError(f"--max-new-tokens must be a positive integer, got {max_new!r}")
            input_path = Path(args.input)
            if not input_path.is_file():
                raise FileNotFoundError(f"--input must be an existing JSONL file, got {str(input_path)!r}")
            intervene_fn = default_intervene_fn(args.model_path, max_new_tokens=max_new,
                                                inference_mode=getattr(args, "inference_mode", "default"))
        summary = run_sweep(
            args.input,
            args.output,
            intervene_fn,
            batch_tokens=args.batch_tokens,
            max_batch_size=getattr(args, "max_batch_size", DEFAULT_MAX_BATCH_SIZE),
            sort_window=getattr(args, "sort_window", DEFAULT_SORT_WINDOW),
            tokenizer=getattr(intervene_fn, "tokenizer", None),
            on_bad_line=args.on_bad_line,
            progress=not getattr(args, "no_progress", False),
        )
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if "on_bad_line='stop'" in str(exc) else 2
    print(json.dumps({"output": os.fspath(args.output), **summary.as_dict()}), file=sys.stderr)
    return 0


__all__ = [
    "BadRecord",
    "SweepSummary",
    "add_intervene_arguments",
    "default_intervene_fn",
    "iter_records",
    "iter_sweep",
    "load_done_ids",
    "main_intervene",
    "make_length_fn",
    "plan_batches",
    "run_sweep",
]
