"""RAVEL data: splits, train/test construction, records for the collator, knowledge filtering.

The data lives in ``../shared/ravel`` next to the repository by default (one Hugging Face
``datasets`` folder per split, ``<domain>_<attribute>_{train,test}``). Override it with the
environment variable ``HYPERDAS_FAST_RAVEL_DIR`` or the ``data_dir`` argument
(``--data-dir`` on the command line).

Flow::

    rows = load_rows("city", "country", "train")        # raw dataset rows (dicts)
    rows = filter_known(rows, model, tokenizer)          # what this model knows (cached)
    records = to_records(rows, tokenizer)                # inputs for HyperDASCollator

``load_dataset(...)`` does the three steps at once.

Splits: where an attribute has no train split here, train and test are both built from
its test rows by a seeded partition of the entities, so that no entity (base or
counterfactual) appears in both; rows that mix the two entity sets are dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..atomic import publish

DOMAINS: Tuple[str, ...] = ("city", "nobel_prize_winner", "occupation", "physical_object", "verb")
DOMAIN_TITLES: Dict[str, str] = {
    "city": "City",
    "nobel_prize_winner": "Nobel Laureate",
    "occupation": "Occupation",
    "physical_object": "Physical Object",
    "verb": "Verb",
}
SPLITS = ("train", "test")
ENV_VAR = "HYPERDAS_FAST_RAVEL_DIR"
LABEL_MODES = ("data", "model")
COLUMNS = (
    "input_prefix", "input_suffix", "counterfactual_input_prefix", "counterfactual_input_suffix",
    "edit_instruction", "entity", "counterfactual_entity", "target", "counterfactual_target",
    "attribute_type", "domain", "attribute", "verify_text",
)


# --------------------------------------------------------------------------- locations

def default_data_dir() -> Path:
    """``$HYPERDAS_FAST_RAVEL_DIR`` or ``<repo>/../shared/ravel``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "ravel"


def resolve_data_dir(data_dir: Optional[str | os.PathLike] = None) -> Path:
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"RAVEL data directory not found: {path}. Pass data_dir= (--data-dir on the command line) "
            f"or set {ENV_VAR}; scripts/download_ravel.py fetches the public files."
        )
    return path.resolve()


def normalize_name(name: str) -> str:
    """'Country of Birth' / 'country-of-birth' -> 'country_of_birth'."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def available_splits(data_dir: Optional[str | os.PathLike] = None) -> Dict[str, Dict[str, Dict[str, Path]]]:
    """{domain: {attribute: {split: folder}}} for the split folders present."""
    root = resolve_data_dir(data_dir)
    found: Dict[str, Dict[str, Dict[str, Path]]] = {}
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        for domain in sorted(DOMAINS, key=len, reverse=True):
            prefix = domain + "_"
            if not entry.name.startswith(prefix):
                continue
            rest = entry.name[len(prefix):]
            for split in SPLITS:
                if rest.endswith("_" + split):
                    attribute = rest[: -len(split) - 1]
                    found.setdefault(domain, {}).setdefault(attribute, {})[split] = entry
            break
    return found


def _resolve_domains(domain: str, splits, data_dir: Optional[str | os.PathLike] = None) -> List[str]:
    """``data_dir``: the folder ``splits`` came from, named in the errors (an empty or wrong
    folder is the usual cause)."""
    name = normalize_name(domain)
    if name == "all":
        domains = [d for d in DOMAINS if d in splits]
        if not domains:
            raise ValueError(f"no RAVEL domain has split folders in the data directory {resolve_data_dir(data_dir)}")
        return domains
    aliases = {normalize_name(t): d for d, t in DOMAIN_TITLES.items()}
    aliases.update({"nobel": "nobel_prize_winner", "nobel_prize": "nobel_prize_winner", "object": "physical_object"})
    name = aliases.get(name, name)
    if name not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)} or 'all'; got {domain!r}")
    if name not in splits:
        raise ValueError(f"domain {name!r} has no split folders in the RAVEL data directory "
                         f"{resolve_data_dir(data_dir)}")
    return [name]


def list_attributes(domain: str, data_dir=None) -> List[str]:
    splits = available_splits(data_dir)
    return sorted(splits.get(_resolve_domains(domain, splits, data_dir)[0], {}))


def _resolve_attributes(domain: str, attribute: Optional[str], splits) -> List[str]:
    attrs = sorted(splits[domain])
    if attribute is None or normalize_name(attribute) in ("", "all"):
        return attrs
    name = normalize_name(attribute)
    if name not in attrs:
        raise ValueError(f"attribute for domain {domain!r} must be one of {', '.join(attrs)}; got {attribute!r}")
    return [name]


# --------------------------------------------------------------------------- rows

def _read_split(folder: Path) -> List[dict]:
    import datasets

    try:
        table = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, IndexError) as exc:
        # malformed state.json / dataset_info.json, a cut arrow file, a dataset saved with no
        # shards (datasets raises IndexError), a folder that is no saved dataset
        raise ValueError(f"RAVEL split {folder} is unreadable: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"RAVEL split {folder} lacks columns {missing}; expected {list(COLUMNS)}")
    return table.to_list()


def entity_disjoint_split(rows: Sequence[dict], test_fraction: float = 0.5, seed: int = 0) -> Tuple[List[dict], List[dict]]:
    """Partition ``rows`` into (train, test) with no entity shared between them.

    Entities (base and counterfactual) are assigned to the test side with probability
    ``test_fraction`` by a seeded shuffle; a row goes to a side when both of its entities
    belong to it, and is dropped otherwise. Deterministic for a given seed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    entities = sorted({r["entity"] for r in rows} | {r["counterfactual_entity"] for r in rows})
    random.Random(seed).shuffle(entities)
    n_test = max(1, int(round(len(entities) * test_fraction)))
    test_entities = set(entities[:n_test])
    train, test = [], []
    for r in rows:
        a, b = r["entity"] in test_entities, r["counterfactual_entity"] in test_entities
        if a and b:
            test.append(r)
        elif not a and not b:
            train.append(r)
    return train, test


def load_rows(
    domain: str,
    attribute: Optional[str] = None,
    split: str = "train",
    data_dir: Optional[str | os.PathLike] = None,
    seed: int = 0,
    test_fraction: float = 0.5,
) -> List[dict]:
    """Raw RAVEL rows of one attribute, one domain (``attribute=None``) or all domains
    (``domain="all"``). Each row gets ``edit_attribute`` (the attribute being edited,
    normalized) and ``split_source`` ("given" or "built")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    splits = available_splits(data_dir)
    out: List[dict] = []
    for dom in _resolve_domains(domain, splits, data_dir):
        for attr in _resolve_attributes(dom, attribute, splits):
            folders = splits[dom][attr]
            if "train" in folders and "test" in folders:
                rows, source = _read_split(folders[split]), "given"
            else:
                only = folders.get("test") or folders.get("train")
                train, test = entity_disjoint_split(_read_split(only), test_fraction, seed)
                rows, source = (train if split == "train" else test), "built"
            for r in rows:
                r = dict(r)
                r["edit_attribute"] = attr
                r["split_source"] = source
                out.append(r)
    return out


# --------------------------------------------------------------------------- records

# the same rule as HyperDASCollator(label_space="auto")
_NO_SPACE_BEFORE_LABEL = ('"', "'", "(", "[", "{", "`")


def label_text(prompt: str, answer: str) -> str:
    """The label as it continues ``prompt``: a leading space unless the prompt ends in a
    quote, bracket or whitespace (then the answer is glued on, as RAVEL's templates are)."""
    answer = answer.strip()
    if not prompt or prompt[-1:].isspace() or prompt.endswith(_NO_SPACE_BEFORE_LABEL):
        return answer
    return " " + answer


def base_prompt(row: dict) -> str:
    return row["input_prefix"] + row["input_suffix"]


def counterfactual_prompt(row: dict) -> str:
    return row["counterfactual_input_prefix"] + row["counterfactual_input_suffix"]


def is_causal(row: dict) -> bool:
    return row["attribute_type"] == "causal"


def expected_answer(row: dict) -> str:
    """What the unintervened model should say for verify_text (and the intervened model
    for the base prompt): the counterfactual's value for causal rows, the base's own for
    isolation rows (whose verify_text is the base prompt)."""
    return row["counterfactual_target"] if is_causal(row) else row["target"]


def entity_last_token(tokenizer, prefix: str, full: str) -> int:
    """Index of the token that holds the last character of ``prefix`` (the entity's last
    token) in ``tokenizer(full)``; robust to merges across the prefix/suffix boundary."""
    if not prefix:
        return 0
    enc = tokenizer(full, add_special_tokens=True, return_offsets_mapping=True)
    offsets = enc.get("offset_mapping") if hasattr(enc, "get") else None
    char = len(prefix.rstrip()) - 1
    if offsets:
        last = 0
        for i, (start, end) in enumerate(offsets):
            if end == start:
                continue  # special token
            if start <= char < end:
                return i
            if start <= char:
                last = i
        return last
    return max(0, len(tokenizer(prefix, add_special_tokens=True)["input_ids"]) - 1)


def to_records(rows: Iterable[dict], tokenizer) -> List[dict]:
    """RAVEL rows -> the collator's records.

    Keys: base_prompt, counterfactual_prompt, concept, label, is_causal, base_entity_pos,
    source_entity_pos, plus metadata (domain, attribute = the edited attribute,
    queried_attribute, entity, counterfactual_entity).
    """
    records = []
    for row in rows:
        base = base_prompt(row)
        source = counterfactual_prompt(row)
        label = row.get("model_label") or expected_answer(row)
        records.append(
            {
                "base_prompt": base,
                "counterfactual_prompt": source,
                "concept": row["edit_instruction"],
                "label": label_text(base, label),
                "is_causal": is_causal(row),
                "base_entity_pos": entity_last_token(tokenizer, row["input_prefix"], base),
                "source_entity_pos": entity_last_token(tokenizer, row["counterfactual_input_prefix"], source),
                "domain": row["domain"],
                "attribute": row.get("edit_attribute") or normalize_name(row["edit_instruction"].rsplit(" - ", 1)[-1]),
                "queried_attribute": normalize_name(row["attribute"]),
                "entity": row["entity"],
                "counterfactual_entity": row["counterfactual_entity"],
            }
        )
    return records


# --------------------------------------------------------------------------- filtering

def normalize_answer(text: str, keep_case: bool = False) -> str:
    text = text.replace("\u2019", "'")
    if not keep_case:
        text = text.lower()
    text = re.sub(r"[\"'`,;:!?()\[\]{}]", " ", text)
    return " ".join(text.split())


def answer_matches(generated: str, target: str) -> bool:
    """Normalized prefix match: the generation starts with the target value (punctuation and
    spacing normalized, case kept: the metric scores the label's exact tokens, so a row the
    model answers "United states" for "United States" would fail even unintervened; the
    no-intervention baseline then fell to 98 % isolation instead of 100 %)."""
    g, t = normalize_answer(generated, keep_case=True), normalize_answer(target, keep_case=True)
    if not t:
        return False
    return g == t or g.startswith(t + " ") or g.startswith(t + ".") or (g.startswith(t) and not t[-1].isalnum())


_STOP = re.compile(r"\n|\"|,|;|\}|\]|\)|\(|\. |:|\t")


def extract_answer(generated: str) -> str:
    """The model's own short answer from a greedy continuation (label mode "model")."""
    cut = _STOP.search(generated)
    text = generated[: cut.start()] if cut else generated
    text = text.rstrip()
    if text.endswith(".") and not re.search(r"\d\.$", text):
        text = text[:-1]
    return text.strip()


def model_fingerprint(model, tokenizer=None) -> str:
    """A short hash of the model's config, a sample of its weights and its tokenizer's
    vocabulary. Not of where they were loaded from: the same weights under another path
    (another HYPERDAS_FAST_CACHE, a copied model folder) share the knowledge-filter cache."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        try:
            fields = config.to_dict()
            fields.pop("_name_or_path", None)
            h.update(json.dumps(fields, sort_keys=True, default=str).encode())
        except Exception:  # pragma: no cover - configs without to_dict
            h.update(repr(config).encode())
    # Every tensor (a model fine-tuned in its later layers only must get a key of its own):
    # its name, shape, float64 sum and 4096 values spread over it; one read of the weights.
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}:{tuple(p.shape)}:{float(torch.sum(flat, dtype=torch.float64))!r}".encode())
            h.update(flat[::step][:4096].to(torch.float32).cpu().numpy().tobytes())
    if tokenizer is not None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        h.update(json.dumps(sorted(vocab.items())).encode())
        h.update(str(len(tokenizer)).encode())
    return h.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def filter_cache_dir() -> Path:
    from ..models.default_model import cache_root

    return cache_root() / "ravel_filtered"


class GenerationCache:
    """prompt -> greedy continuation, per model, persisted as JSON (atomic writes)."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.data: Dict[str, str] = {}
        if path is not None and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except (OSError, ValueError):
                self.data = {}  # a damaged cache is rebuilt

    def save(self):
        if self.path is not None:
            _atomic_write_text(self.path, json.dumps(self.data))


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 6, batch_size: int = 32) -> List[str]:
    """Greedy continuations (decoded text) of ``prompts``; batched with left padding,
    prompts sorted by length to limit padding."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: List[Optional[str]] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                num_beams=1,
            )
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = t
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out  # type: ignore[return-value]


def _rows_key(rows: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r[c] for c in COLUMNS]).encode())
    return h.hexdigest()[:16]


def filter_known(
    rows: Sequence[dict],
    model,
    tokenizer,
    label_mode: str = "data",
    max_examples: Optional[int] = None,
    seed: int = 0,
    cache: bool = True,
    cache_dir: Optional[Path] = None,
    batch_size: int = 32,
    max_new_tokens: int = 6,
    chunk_size: int = 256,
    progress: bool = False,
) -> List[dict]:
    """Keep the rows this model knows, as RAVEL does.

    label_mode "data": keep a row when the unintervened model's greedy continuation of the
    base prompt starts with the base entity's value (``target``) and its continuation of
    ``verify_text`` starts with the expected answer (the counterfactual's value for causal
    rows). label_mode "model": the model's own greedy answer to verify_text becomes the
    label (``row["model_label"]``); a causal row is kept when that answer differs from the
    model's answer for the base prompt (otherwise the intervention would be untestable).

    Rows are visited in a seeded shuffled order, in chunks, until ``max_examples`` are
    kept. Greedy continuations are cached per model under ``cache_dir`` (default
    ``$HYPERDAS_FAST_CACHE/ravel_filtered``), and so is the kept set.

    ``max_new_tokens`` is the continuation's length, except in label_mode "data" where a
    value the row expects is longer (with a tokenizer to count it): that prompt gets the
    value's tokens plus one, so a long value ("America/Argentina/Buenos_Aires") can match
    at all. With 6 tokens for every prompt, about 10 % of the city-timezone rows and 4 % of
    the city-language rows could never be kept (values over 6 SmolLM2 tokens:
    results/ravel/answer_lengths_smollm2.json).
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}; got {label_mode!r}")
    if max_examples is not None and max_examples <= 0:
        raise ValueError(f"max_examples must be a positive integer or None; got {max_examples}")
    fp = model_fingerprint(model, tokenizer)
    root = Path(cache_dir) if cache_dir is not None else filter_cache_dir()
    # generations of another length judge answers differently ("United" vs "United States"):
    # max_new_tokens is part of both keys. "data3": answer_matches keeps case (sets kept by
    # the case-insensitive match, "data", are not reused), and long values get longer
    # continuations (sets kept with 6 tokens for every prompt, "data2", are not reused).
    fit_lengths = label_mode == "data" and tokenizer is not None
    mode_key = ("data3" if fit_lengths else "data2") if label_mode == "data" else label_mode
    result_path = root / fp / f"kept-{_rows_key(rows)}-{mode_key}-{max_examples}-{seed}-{max_new_tokens}.json"
    if cache and result_path.is_file():
        try:
            return json.loads(result_path.read_text())
        except (OSError, ValueError):
            pass
    gen_caches: Dict[int, GenerationCache] = {}  # continuation length -> its cache

    def gen_cache(length: int) -> GenerationCache:
        if length not in gen_caches:
            gen_caches[length] = GenerationCache(root / fp / f"generations-{length}.json" if cache else None)
        return gen_caches[length]

    def length_for(answer: str) -> int:
        if not fit_lengths:
            return max_new_tokens
        return max(max_new_tokens, len(tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids) + 1)

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    kept: List[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="knowledge filter", unit="row")
    start = 0
    while start < len(order):
        size = chunk_size
        if max_examples is not None:  # small requests generate for few rows first
            size = max(8, min(chunk_size, 2 * (max_examples - len(kept))))
        chunk = [rows[i] for i in order[start : start + size]]
        start += size
        lengths: Dict[str, int] = {}  # prompt -> its continuation's length
        for r in chunk:
            for prompt, answer in ((base_prompt(r), r["target"]), (r["verify_text"], expected_answer(r))):
                lengths[prompt] = max(lengths.get(prompt, max_new_tokens), length_for(answer))
        for length in sorted(set(lengths.values())):
            todo = sorted(p for p, n in lengths.items() if n == length and p not in gen_cache(length).data)
            if todo:
                for p, g in zip(todo, greedy_generate(model, tokenizer, todo, length, batch_size)):
                    gen_cache(length).data[p] = g
                gen_cache(length).save()
        for r in chunk:
            g_base = gen_cache(lengths[base_prompt(r)]).data[base_prompt(r)]
            g_verify = gen_cache(lengths[r["verify_text"]]).data[r["verify_text"]]
            if label_mode == "data":
                ok = answer_matches(g_base, r["target"]) and answer_matches(g_verify, expected_answer(r))
                if ok:
                    kept.append(dict(r))
            else:
                answer = extract_answer(g_verify)
                base_answer = extract_answer(g_base)
                if not answer:
                    continue
                if is_causal(r) and normalize_answer(answer) == normalize_answer(base_answer):
                    continue
                row = dict(r)
                row["model_label"] = answer
                kept.append(row)
            if max_examples is not None and len(kept) >= max_examples:
                break
        if bar is not None:
            bar.update(len(chunk))
        if max_examples is not None and len(kept) >= max_examples:
            break
    if bar is not None:
        bar.close()
    if cache:
        _atomic_write_text(result_path, json.dumps(kept))
    return kept


# --------------------------------------------------------------------------- all at once

def load_dataset(
    domain: str,
    attribute: Optional[str] = None,
    split: str = "train",
    data_dir=None,
    model=None,
    tokenizer=None,
    filter: bool = True,
    label_mode: str = "data",
    max_examples: Optional[int] = None,
    seed: int = 0,
    cache: bool = True,
    progress: bool = False,
) -> List[dict]:
    """Rows -> (knowledge filter for ``model``) -> collator records.

    With several domains (``domain="all"``) each domain is loaded, filtered and capped on
    its own and the records are concatenated in domain order: ``max_examples`` is a cap
    *per domain*, and a domain's records are exactly those ``load_dataset(<that domain>,
    ...)`` returns, so a joint model (HyperDAS on "all") and per-domain models (MDAS) see
    the same training and test examples.

    Raises ValueError when no usable row is left."""
    if tokenizer is None:
        raise ValueError("tokenizer is required to compute entity positions")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples <= 0):
        raise ValueError(f"max_examples must be a positive integer or None; got {max_examples!r}")
    domains = _resolve_domains(domain, available_splits(data_dir), data_dir)
    if len(domains) > 1:
        records: List[dict] = []
        for dom in domains:
            records += load_dataset(dom, attribute, split, data_dir, model=model, tokenizer=tokenizer, filter=filter,
                                    label_mode=label_mode, max_examples=max_examples, seed=seed, cache=cache,
                                    progress=progress)
        return records
    rows = load_rows(domain, attribute, split, data_dir, seed=seed)
    if not rows:
        raise ValueError(f"RAVEL split {split!r} for domain={domain!r}, attribute={attribute!r} has no rows")
    if filter:
        if model is None:
            raise ValueError("filter=True needs the target model (model=...)")
        rows = filter_known(rows, model, tokenizer, label_mode, max_examples, seed, cache, progress=progress)
    else:
        if label_mode == "model":
            raise ValueError("label_mode='model' needs filter=True (labels come from the model's answers)")
        if max_examples is not None:
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            rows = [rows[i] for i in order[:max_examples]]
    if not rows:
        raise ValueError(
            f"no usable rows after knowledge filtering: domain={domain!r}, attribute={attribute!r}, "
            f"split={split!r}, label_mode={label_mode!r}. The model knows none of these facts; "
            "try label_mode='model' (--label-mode model) or more examples."
        )
    return to_records(rows, tokenizer)
