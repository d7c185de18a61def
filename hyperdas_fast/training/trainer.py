"""The trainer for HyperDAS and the MDAS baseline on RAVEL.

    from hyperdas_fast import HyperDAS
    from hyperdas_fast.training.trainer import Trainer, TrainConfig

    hd = HyperDAS(layer=15, feature_dim=128)
    metrics = Trainer(hd, TrainConfig(domain="city", attribute="country", epochs=1,
                                      checkpoint_dir="checkpoints/city")).train()

One step: collate a batch -> model forward (soft weights, logits at the label positions
only) -> ``hyperdas_loss`` (causal / isolation weights + scheduled sparsity penalty) ->
backward -> (all-reduce gradients when distributed) -> clip -> AdamW -> LR schedule.

Determinism and resume: the initial weights come from the model's constructor (seed them
with ``HyperDAS(..., seed=)``; the command line passes ``--seed``); the data order of epoch
e is a permutation drawn from its own generator seeded with (seed, e); checkpoints hold the trainable parameters, optimizer,
scheduler, RNG states, step and epoch position, so a resumed run reaches the same
weights as an uninterrupted one with the same seed.

The run folder (``checkpoint_dir``) gets: ``ckpt-*.safetensors`` (training state),
``final/`` (the trained model in the wrapper's save format), ``train_config.json``,
``metrics.jsonl`` (every logged row), ``train.csv`` / ``eval.csv``, ``results.json``
(final evaluation on the test split) and, with ``tensorboard=True``, TensorBoard events.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..data.collate import IGNORE_INDEX, HyperDASCollator
from ..evaluation.metrics import evaluate
from ..evaluation.tables import atomic_write_json, atomic_write_text
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .losses import hyperdas_loss, sparsity_schedule


@dataclass
class TrainConfig:
    """Training options (defaults follow the paper where it gives them)."""

    data_dir: Optional[str] = None          # RAVEL folder (default ../shared/ravel or $HYPERDAS_FAST_RAVEL_DIR)
    domain: str = "city"                    # a RAVEL domain or "all"
    attribute: Optional[str] = None         # one attribute of the domain, or None = all of them
    epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int = 32
    lr: float = 4e-5
    basis_lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 4.0
    causal_weight: float = 3.5
    isolation_weight: float = 0.5
    sparsity_start: float = 0.15
    sparsity_end: float = 1.5
    sparsity_warmup: float = 0.1            # warm-up: a fraction of the total steps (<1) or a step count (>=1)
    lr_schedule: str = "linear"             # "linear" (warm-up then linear decay to 0) or "constant"
    lr_warmup_steps: int = 0
    seed: int = 0
    eval_every: int = 0                     # evaluate on the test split every N steps (0: only at the end)
    eval_modes: Optional[Tuple[str, ...]] = None   # None: ("default",) for HyperDAS, ("groundtruth",) for MDAS
    eval_max_examples: Optional[int] = 128  # test examples used by the periodic evaluation
    final_eval: bool = True                 # evaluate on the whole (filtered) test split at the end
    final_eval_modes: Optional[Tuple[str, ...]] = None  # None: every mode the model supports
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0               # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    max_steps: Optional[int] = None
    max_examples: Optional[int] = None      # cap on kept training examples (after filtering)
    max_test_examples: Optional[int] = None
    filter: bool = True                     # knowledge filtering for the target model
    label_mode: str = "data"                # "data" or "model" (the model's own greedy answers)
    log_path: Optional[str] = None          # JSONL log (default <checkpoint_dir>/metrics.jsonl)
    tensorboard: bool = False
    resume: Union[bool, str] = False        # True: newest checkpoint in checkpoint_dir; or a checkpoint path
    overwrite: bool = False                 # a new run may replace an earlier run's files in checkpoint_dir
    progress: bool = True
    save_final: bool = True
    train_records: Optional[List[dict]] = field(default=None, repr=False)  # bypass RAVEL loading
    eval_records: Optional[List[dict]] = field(default=None, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("train_records", "eval_records"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "checkpoint_every", "lr_warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("max_steps", "max_examples", "max_test_examples", "eval_max_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ValueError(f"lr_schedule must be 'linear' or 'constant', got {self.lr_schedule!r}")
        if self.label_mode not in ("data", "model"):
            raise ValueError(f"label_mode must be 'data' or 'model', got {self.label_mode!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        if self.resume and not self.checkpoint_dir and not isinstance(self.resume, (str, os.PathLike)):
            raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint path)")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the earlier run, or replace it")
        from ..models.selector import INFERENCE_MODES

        for name in ("eval_modes", "final_eval_modes"):
            unknown = [m for m in (getattr(self, name) or ()) if m not in INFERENCE_MODES]
            if unknown:
                raise ValueError(f"{name} has unknown inference modes {unknown}; valid: {list(INFERENCE_MODES)}")


# TrainConfig fields that may differ between a run and the run it resumes: how long it
# trains, what it logs, evaluates and saves, and where. Any other difference (learning
# rate, batch size, seed, data, loss weights, ...) would make the resumed run a mix of two
# runs, so resume refuses it.
RESUMABLE_CHANGES = frozenset({
    "data_dir", "epochs", "max_steps", "eval_every", "eval_modes", "eval_max_examples", "eval_batch_size",
    "final_eval", "final_eval_modes", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "log_path",
    "tensorboard", "resume", "overwrite", "progress", "save_final",
})

# What the trainer writes into a run folder (checkpoint_dir): a new run there must not mix
# with an earlier run's (its checkpoints would outrank the new ones in pruning and resume,
# its metrics rows would stay in metrics.jsonl).
RUN_FILES = ("ckpt-*.safetensors", "final", "train_config.json", "metrics.jsonl", "train.csv", "eval.csv",
             "results.json", "tensorboard", "eval_*.json", "eval_*.md")


def earlier_run_files(run_dir: Path) -> List[Path]:
    return sorted({p for pattern in RUN_FILES for p in Path(run_dir).glob(pattern)})


class MetricsLogger:
    """JSONL of every row plus CSVs of train and eval rows; truncatable on resume."""

    TRAIN_FIELDS = ["step", "epoch", "loss", "causal_loss", "isolation_loss", "sparsity", "sparsity_coef", "lr",
                    "basis_lr", "grad_norm", "num_label_tokens", "examples", "seconds", "examples_per_s"]
    EVAL_FIELDS = ["step", "mode", "causal", "isolation", "disentangle", "n_causal", "n_isolation"]

    def __init__(self, jsonl: Optional[Path], enabled: bool = True, tensorboard_dir: Optional[Path] = None):
        self.jsonl = jsonl if enabled else None
        self.rows: List[dict] = []
        self.tb = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except Exception as exc:  # tensorboard not installed
                warnings.warn(f"tensorboard=True but TensorBoard is unavailable ({exc}); logging to JSONL/CSV only")
        if self.jsonl is not None and self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except ValueError:
                    pass  # a torn last line from a killed run

    def truncate_after(self, step: int) -> None:
        """Forget rows logged after ``step`` (a resumed run logs them again)."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        self._rewrite()

    def _rewrite(self) -> None:
        if self.jsonl is None:
            return
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csvs()

    def _write_csvs(self) -> None:
        for kind, fields, name in (("train", self.TRAIN_FIELDS, "train.csv"), ("eval", self.EVAL_FIELDS, "eval.csv")):
            rows = [r for r in self.rows if r.get("type") == kind]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(self.jsonl.parent / name, buf.getvalue())

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            prefix = row.get("type", "train")
            tag_extra = f"/{row['mode']}" if "mode" in row else ""
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    self.tb.add_scalar(f"{prefix}{tag_extra}/{key}", value, row.get("step", 0))

    def close(self) -> None:
        if self.jsonl is not None:
            self._write_csvs()
        if self.tb is not None:
            self.tb.close()


def method_name(obj) -> str:
    name = type(obj).__name__
    return {"HyperDASModel": "HyperDAS", "MDASModel": "MDAS"}.get(name, name)


def spread(records: Sequence[Any], n: Optional[int]) -> List[Any]:
    """n records evenly spread over ``records`` (all of them when n is None or larger). The
    test records come grouped by domain (--domain all) and attribute: the first n of them,
    which the periodic evaluation used to take, covered only the first domain or two."""
    if n is None or n >= len(records):
        return list(records)
    return [records[i * len(records) // n] for i in range(n)]


class Trainer:
    """Trains a ``HyperDAS`` / ``MDAS`` wrapper, or a bare ``HyperDASModel`` / ``MDASModel``
    (pass ``tokenizer=`` then). ``callbacks``: functions ``f(trainer, step, row)`` called
    after every optimizer step (and after that step's checkpoint)."""

    def __init__(self, hd_or_model, config: Optional[TrainConfig] = None, tokenizer=None,
                 callbacks: Optional[Sequence[Callable]] = None):
        self.config = config or TrainConfig()
        self.config.validate()
        if isinstance(hd_or_model, nn.Module):
            self.wrapper, self.net = None, hd_or_model
        elif isinstance(getattr(hd_or_model, "model", None), nn.Module):
            self.wrapper, self.net = hd_or_model, hd_or_model.model
        else:
            raise ValueError(f"Trainer needs a HyperDAS/MDAS wrapper or their nn.Module, got {type(hd_or_model).__name__}")
        self.tokenizer = tokenizer or getattr(self.wrapper, "tokenizer", None) or getattr(self.net, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer=... with a bare model")
        self.collator = getattr(self.wrapper, "collator", None) or HyperDASCollator(self.tokenizer)
        self.method = method_name(self.wrapper if self.wrapper is not None else self.net)
        self.callbacks = list(callbacks or [])
        self.dist = dist_utils.init_distributed()
        self.step = 0
        self.train_records: List[dict] = []
        self.eval_records: List[dict] = []
        self.optimizer = None
        self.scheduler = None

    # -- data ----------------------------------------------------------------------
    @property
    def target(self):
        return getattr(self.net, "target", None) or getattr(self.wrapper, "target", None)

    def _load(self, split: str, max_examples: Optional[int]) -> List[dict]:
        from ..data import ravel

        c = self.config
        return ravel.load_dataset(c.domain, c.attribute, split, c.data_dir, model=self.target, tokenizer=self.tokenizer,
                                  filter=c.filter, label_mode=c.label_mode, max_examples=max_examples, seed=c.seed,
                                  progress=c.progress and self.dist.is_main)

    def prepare_data(self) -> None:
        c = self.config
        # rank 0 filters first (and fills the cache); the others then read the cache
        if self.dist.enabled and not self.dist.is_main:
            dist_utils.barrier(self.dist)
        self.train_records = list(c.train_records) if c.train_records is not None else self._load("train", c.max_examples)
        need_eval = c.eval_every > 0 or c.final_eval
        if c.eval_records is not None:
            self.eval_records = list(c.eval_records)
        elif need_eval:
            self.eval_records = self._load("test", c.max_test_examples)
        if self.dist.enabled and self.dist.is_main:
            dist_utils.barrier(self.dist)
        if not self.train_records:
            raise ValueError("no training examples (train_records is empty)")

    def epoch_order(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + epoch)
        return torch.randperm(len(self.train_records), generator=g).tolist()

    # -- optimisation ------------------------------------------------------------
    def parameter_groups(self) -> List[Dict[str, Any]]:
        c = self.config
        if hasattr(self.net, "parameter_groups"):
            groups = self.net.parameter_groups(lr=c.lr, basis_lr=c.basis_lr, weight_decay=c.weight_decay)
        else:
            basis, rest = [], []
            for name, p in self.net.named_parameters():
                if p.requires_grad:
                    (basis if "basis" in name else rest).append(p)
            groups = [{"params": rest, "lr": c.lr, "weight_decay": c.weight_decay, "name": "main"},
                      {"params": basis, "lr": c.basis_lr, "weight_decay": 0.0, "name": "basis"}]
        groups = [g for g in groups if len(g["params"])]
        if not groups:
            raise ValueError("the model has no trainable parameters")
        return groups

    def trainable(self) -> List[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _lr_lambda(self, total: int):
        c = self.config

        def f(step: int) -> float:
            if c.lr_warmup_steps and step < c.lr_warmup_steps:
                return (step + 1) / c.lr_warmup_steps
            if c.lr_schedule == "constant":
                return 1.0
            span = max(1, total - c.lr_warmup_steps)
            return max(0.0, 1.0 - (step - c.lr_warmup_steps) / span)

        return f

    def eval_modes(self, final: bool = False) -> Tuple[str, ...]:
        from ..models.selector import INFERENCE_MODES

        supported = tuple(getattr(self.net, "supported_inference_modes", INFERENCE_MODES))
        wanted = self.config.final_eval_modes if final else self.config.eval_modes
        if wanted is None:
            return supported if final else supported[:1]
        modes = tuple(m for m in wanted if m in supported)
        dropped = [m for m in wanted if m not in supported]
        if dropped:
            warnings.warn(f"{self.method} does not support the inference modes {dropped}; "
                          f"evaluating {list(modes or supported[:1])}")
        return modes or supported[:1]

    # -- loop ----------------------------------------------------------------------
    def _forward_loss(self, records: List[dict], sparsity_coef: float):
        """(loss, parts) of this rank's records; (None, zero parts) for a rank given none.

        Data-parallel: the loss's means divide by the whole batch's counts (summed over
        the ranks, which every rank must join, with or without records), so the ranks'
        gradients add up to the whole batch's; a mean of the ranks' own means had weighted
        examples by their shard's size (a lone example on one rank counted as half a batch)."""
        c = self.config
        batch = self.collator(records) if records else None
        out = self.net(batch, logits_at="labels") if batch is not None else None
        totals = None
        if self.dist.enabled:
            counts = [0, 0, 0]
            if batch is not None:
                has_label = batch["labels"] != IGNORE_INDEX
                causal = batch["is_causal"].bool()
                counts = [int(has_label[causal].sum()), int(has_label[~causal].sum()), len(records)]
            counts = dist_utils.all_reduce_sum(counts, self.dist)
            totals = dict(causal_tokens=int(counts[0]), isolation_tokens=int(counts[1]), examples=int(counts[2]))
        if batch is None:
            return None, {"loss": 0.0, "causal_loss": 0.0, "isolation_loss": 0.0, "sparsity": 0.0,
                          "num_label_tokens": 0}
        return hyperdas_loss(out.logits, batch["labels"].to(out.logits.device), batch["is_causal"], out.weights,
                             causal_weight=c.causal_weight, isolation_weight=c.isolation_weight,
                             sparsity_coef=sparsity_coef, totals=totals)

    def run_eval(self, records: Sequence[dict], modes: Sequence[str]) -> Dict[str, Any]:
        return evaluate(self.net, records, self.collator, modes=modes, batch_size=self.config.eval_batch_size,
                        progress=self.config.progress and self.dist.is_main)

    def _model_config(self) -> Dict[str, Any]:
        """The model's construction options (layer, feature_dim, subspace, selector, ...): the
        wrapper's config, completed from the model itself (so a bare HyperDASModel / MDASModel
        records them too). Written to train_config.json and to every checkpoint."""
        config = dict(getattr(self.wrapper, "config", None) or {})
        for key, attr in (("layer", "layer"), ("feature_dim", "feature_dim"),
                          ("num_hypernet_layers", "num_hypernet_layers"), ("subspace", "subspace_name"),
                          ("selector", "selector_name")):
            if hasattr(self.net, attr):
                config[key] = getattr(self.net, attr)
        if hasattr(getattr(self.net, "hypernet", None), "rotary"):
            config["hypernet_rotary"] = self.net.hypernet.rotary
            config["hypernet_qk_norm"] = self.net.hypernet.qk_norm
        return config

    def _write_run_config(self, run_dir: Path) -> None:
        info = {
            "method": self.method,
            "model": getattr(self.wrapper, "model_name", None),
            "model_config": self._model_config(),
            "train": self.config.to_dict(),
            "train_examples": len(self.train_records),
            "test_examples": len(self.eval_records),
            "world_size": self.dist.world_size,
        }
        atomic_write_json(run_dir / "train_config.json", info)

    def _claim_run_dir(self, run_dir: Path) -> None:
        """A new run (not resume) starts in an empty run folder: it refuses one that holds an
        earlier run, or with overwrite=True removes that run's files first."""
        c = self.config
        earlier = earlier_run_files(run_dir)
        if not earlier or c.resume:
            return
        if not c.overwrite:
            names = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise ValueError(f"checkpoint_dir {run_dir} already holds a run ({names}): resume it (--resume), "
                             f"replace it (--overwrite), or choose another checkpoint_dir")
        if self.dist.is_main:
            import shutil

            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _resume(self, run_dir: Optional[Path], total: int, logger: "MetricsLogger") -> None:
        """Restores the newest readable checkpoint (or the one named by resume=); sets aside
        (renames, deletes nothing) the checkpoints after it, damaged or from the run it
        abandons, so that they neither outrank this run's checkpoints nor get resumed later."""
        c = self.config
        main = self.dist.is_main
        path = Path(c.resume) if isinstance(c.resume, (str, os.PathLike)) and not isinstance(c.resume, bool) else None
        if path is not None and path.is_dir():
            path = ckpt.latest_checkpoint(path)
        elif path is None:
            path = ckpt.latest_checkpoint(run_dir)
        if path is not None:
            # checked before anything is restored: a refused resume leaves the model as it was
            state = ckpt.read_state(path)
            step = int(state["step"])
            trainer_state = state.get("trainer", {})
            saved_n = trainer_state.get("num_train_examples")
            if saved_n is not None and saved_n != len(self.train_records):
                raise ValueError(f"cannot resume from {path}: it was trained on {saved_n} examples, "
                                 f"this run has {len(self.train_records)}")
            saved, now = trainer_state.get("config") or {}, c.to_dict()
            changed = sorted(k for k in saved.keys() & now.keys() if k not in RESUMABLE_CHANGES and saved[k] != now[k])
            if changed:
                diff = ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in changed)
                raise ValueError(f"cannot resume from {path}: it was trained with {diff}; pass the same options, "
                                 f"or start a new run in another checkpoint_dir")
            saved_model = dict(trainer_state.get("model_config") or {})
            if hasattr(self.net, "selector_name"):
                # options a HyperDAS checkpoint saved before they existed was trained without
                from ..models.hyperdas import LEGACY_OPTIONS

                saved_model = {**LEGACY_OPTIONS, **saved_model}
            now_model = self._model_config()
            # init_from_target only decides the initial weights, which the resume overwrites
            changed = sorted(k for k in saved_model.keys() & now_model.keys()
                             if k != "init_from_target" and saved_model[k] != now_model[k])
            if changed:
                diff = ", ".join(f"{k}={saved_model[k]!r} (now {now_model[k]!r})" for k in changed)
                raise ValueError(f"cannot resume from {path}: its model was built with {diff}; build it the same "
                                 f"way, or start a new run in another checkpoint_dir")
            if step > total:
                raise ValueError(f"cannot resume from {path}: it is at step {step}, beyond this run's {total} steps")
            ckpt.load_checkpoint(path, self.net, self.optimizer, self.scheduler)
            self.step = step
        elif main:
            warnings.warn(f"resume requested but no checkpoint found in {run_dir}; starting from scratch")
        if main:
            if run_dir is not None:
                for later_step, later in ckpt.list_checkpoints(run_dir):
                    if later_step > self.step:
                        try:
                            ckpt.read_checkpoint(later)
                            reason = "superseded"
                        except ckpt.CheckpointError:
                            reason = "damaged"
                        moved = ckpt.set_aside(later, reason)
                        warnings.warn(f"resuming at step {self.step}: set aside {later.name} as {moved.name}")
            logger.truncate_after(self.step)

    def train(self) -> Dict[str, Any]:
        c = self.config
        torch.manual_seed(c.seed)
        run_dir = Path(c.checkpoint_dir) if c.checkpoint_dir else None
        main = self.dist.is_main
        if run_dir is not None:
            self._claim_run_dir(run_dir)
            if main:
                for stale in ckpt.remove_stale_temp_files(run_dir):
                    warnings.warn(f"removed {stale}, left by a checkpoint save that was killed mid-write")
        self.prepare_data()
        n = len(self.train_records)
        steps_per_epoch = math.ceil(n / c.batch_size)
        total = steps_per_epoch * c.epochs
        if c.max_steps is not None:
            total = min(total, c.max_steps)
        warm = int(c.sparsity_warmup * total) if c.sparsity_warmup < 1 else int(c.sparsity_warmup)

        self.optimizer = torch.optim.AdamW(self.parameter_groups(), lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda(total))
        dist_utils.broadcast_parameters(ckpt.model_state(self.net).values(), self.dist)

        log_path = Path(c.log_path) if c.log_path else (run_dir / "metrics.jsonl" if run_dir else None)
        tb_dir = (run_dir or Path("runs")) / "tensorboard" if c.tensorboard else None
        logger = MetricsLogger(log_path, enabled=main and log_path is not None, tensorboard_dir=tb_dir)

        self.step = 0
        if c.resume:
            self._resume(run_dir, total, logger)
        if run_dir is not None and main:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._write_run_config(run_dir)

        bar = None
        if c.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc=f"train {self.method}", unit="step")
        self.net.train()
        last_row: Dict[str, Any] = {}
        order_epoch, order = -1, []
        t_start = time.time()
        try:
            while self.step < total:
                epoch, pos = divmod(self.step, steps_per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = self.epoch_order(epoch), epoch
                idx = order[pos * c.batch_size:(pos + 1) * c.batch_size]
                mine = dist_utils.shard(idx, self.dist)
                coef = sparsity_schedule(self.step, warm, total, c.sparsity_start, c.sparsity_end)
                t0 = time.time()
                self.optimizer.zero_grad(set_to_none=True)
                # a rank given no records (fewer examples than ranks) still joins the counts
                loss, parts = self._forward_loss([self.train_records[i] for i in mine], coef)
                if loss is not None:
                    loss.backward()
                params = self.trainable()
                # each rank's loss is its share of the whole batch's: the gradients add up
                dist_utils.all_reduce_gradients(params, self.dist, average=False)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip) if c.grad_clip else torch.tensor(0.0)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                seconds = time.time() - t0
                values = dist_utils.all_reduce_sum(
                    [parts["loss"], parts["causal_loss"], parts["isolation_loss"], parts["sparsity"],
                     parts["num_label_tokens"]], self.dist)
                lrs = [g["lr"] for g in self.optimizer.param_groups]
                names = [g.get("name", "") for g in self.optimizer.param_groups]
                row = {
                    "type": "train", "step": self.step, "epoch": epoch, "loss": values[0], "causal_loss": values[1],
                    "isolation_loss": values[2], "sparsity": values[3], "sparsity_coef": coef,
                    "lr": lrs[names.index("main")] if "main" in names else lrs[0],
                    "basis_lr": lrs[names.index("basis")] if "basis" in names else None,
                    "grad_norm": float(grad_norm), "num_label_tokens": int(values[4]),
                    "examples": len(idx), "seconds": seconds, "examples_per_s": len(idx) / max(seconds, 1e-9),
                }
                logger.log(row)
                last_row = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                if c.eval_every and self.step % c.eval_every == 0 and self.step < total and self.eval_records:
                    self._periodic_eval(logger)
                if run_dir is not None and c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < total:
                    self.save_checkpoint(run_dir, epoch, pos + 1)
                for cb in self.callbacks:
                    cb(self, self.step, row)
        finally:
            if bar is not None:
                bar.close()
        result: Dict[str, Any] = {"method": self.method, "steps": self.step, "train_examples": n,
                                  "final_train": last_row, "train_seconds": time.time() - t_start}
        if run_dir is not None:
            self.save_checkpoint(run_dir, (self.step - 1) // steps_per_epoch if self.step else 0, None)
            if c.save_final and main and self.wrapper is not None and hasattr(self.wrapper, "save"):
                self.wrapper.save(run_dir / "final")
        if self.eval_records and c.final_eval:
            if main:
                metrics = self.run_eval(self.eval_records, self.eval_modes(final=True))
                result["eval"] = metrics
                result["test_examples"] = len(self.eval_records)
                for mode, summary in metrics.items():
                    logger.log({"type": "eval", "step": self.step, "mode": mode, "final": True, **summary["overall"]})
                if run_dir is not None:
                    atomic_write_json(run_dir / "results.json", self.results_record(metrics))
            dist_utils.barrier(self.dist)
        elif self.eval_records and c.eval_every:
            # every rank: the evaluation runs on the main one and ends in a barrier that all
            # must reach (called on the main rank alone, the others had left and it failed)
            self._periodic_eval(logger)
        logger.close()
        return result

    def _periodic_eval(self, logger: MetricsLogger) -> None:
        if self.dist.is_main:
            records = spread(self.eval_records, self.config.eval_max_examples)
            metrics = self.run_eval(records, self.eval_modes())
            for mode, summary in metrics.items():
                logger.log({"type": "eval", "step": self.step, "mode": mode, **summary["overall"]})
            self.net.train()
        dist_utils.barrier(self.dist)

    def save_checkpoint(self, run_dir: Path, epoch: int, next_pos: Optional[int]) -> Optional[Path]:
        if not self.dist.is_main:
            return None
        state = {"epoch": epoch, "num_train_examples": len(self.train_records), "seed": self.config.seed,
                 "data_order": {"generator_seed": int(self.config.seed) * 1_000_003 + epoch, "next_batch": next_pos},
                 "config": self.config.to_dict(), "method": self.method, "model_config": self._model_config()}
        return ckpt.save_checkpoint(run_dir, self.step, self.net, self.optimizer, self.scheduler, state,
                                    keep=self.config.keep_checkpoints)

    def results_record(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """The dict written to results.json (what the table builder reads)."""
        c = self.config
        primary = "groundtruth" if self.method == "MDAS" else ("default" if "default" in metrics else next(iter(metrics)))
        mc = getattr(self.wrapper, "config", {}) or {}
        return {"method": self.method, "model": getattr(self.wrapper, "model_name", None), "domain": c.domain,
                "attribute": c.attribute, "primary_mode": primary, "metrics": metrics,
                "layer": mc.get("layer"), "feature_dim": mc.get("feature_dim"), "label_mode": c.label_mode,
                "train_examples": len(self.train_records), "test_examples": len(self.eval_records), "steps": self.step}


__all__ = ["TrainConfig", "Trainer", "MetricsLogger"]
