"""Command-line entry points.

Console scripts (setup.py): ``hyperdas-fast`` (subcommands ``train``, ``evaluate``,
``table``, ``intervene``), ``hyperdas-train`` and ``hyperdas-evaluate``; ``train.py`` and
``evaluate.py`` at the repository root call the same functions, with the paper README's
arguments::

    python train.py --domain city --layer 15 --feature_dim 128 --epochs 5
    python train.py --domain all --method mdas ...
    python evaluate.py --model_path checkpoints/hyperdas_city --domain city
    hyperdas-fast table checkpoints/*/results.json --out results/table

Every option accepts both spellings (``--feature_dim`` / ``--feature-dim``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

METHODS = ("hyperdas", "mdas")


def _opt(parser, name: str, **kw):
    """Add ``--a_b`` and ``--a-b`` as one option."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*names, dest=name, **kw)


def _dtype(name: Optional[str]):
    import torch

    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"--dtype must be one of {sorted(table)}; got {name!r}")
    return table[name]


def _check_device(device: Optional[str]) -> None:
    """Fail with a clear message before loading anything: torch's own error for a CUDA device on
    a CPU-only build is an AssertionError deep inside the model load."""
    import torch

    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False); use --device cpu or leave --device out")


# --------------------------------------------------------------------------- train

def add_train_args(p: argparse.ArgumentParser) -> None:
    from .models.selector import INFERENCE_MODES

    _opt(p, "domain", default="city", help="RAVEL domain (city, nobel_prize_winner, occupation, physical_object, verb) or 'all'")
    _opt(p, "attribute", default=None, help="one attribute of the domain (default: all of them)")
    _opt(p, "method", default="hyperdas", choices=METHODS)
    _opt(p, "model", default=None, help="HF model name or local path (default: the embedded SmolLM2-135M-Instruct)")
    _opt(p, "layer", type=int, default=15)
    _opt(p, "feature_dim", type=int, default=128)
    _opt(p, "num_hypernet_layers", type=int, default=2)
    _opt(p, "subspace", default="reflect", choices=("reflect", "mask", "das", "boundless"))
    _opt(p, "selector", default="rotary", choices=("rotary", "additive"),
         help="HyperDAS position selector: 'rotary' pair positions as in the original, or 'additive' "
              "(no rotary; every base token then prefers the same source token)")
    _opt(p, "hypernet_rotary", action="store_true",
         help="HyperDAS: rotary positions on the hypernetwork's cross-attention keys, as in the original "
              "(projects every key: slower)")
    p.add_argument("--no-hypernet-qk-norm", "--no_hypernet_qk_norm", dest="hypernet_qk_norm", action="store_false",
                   help="HyperDAS: leave the target's query/key norms (Qwen3) out of the hypernetwork's "
                        "cross-attention, as runs from before they were copied did")
    _opt(p, "epochs", type=int, default=5)
    _opt(p, "batch_size", type=int, default=16)
    _opt(p, "eval_batch_size", type=int, default=32)
    _opt(p, "lr", type=float, default=4e-5)
    _opt(p, "basis_lr", type=float, default=1e-3)
    _opt(p, "weight_decay", type=float, default=0.01)
    _opt(p, "grad_clip", type=float, default=4.0)
    _opt(p, "causal_weight", type=float, default=3.5)
    _opt(p, "isolation_weight", type=float, default=0.5)
    _opt(p, "sparsity_start", type=float, default=0.15)
    _opt(p, "sparsity_end", type=float, default=1.5)
    _opt(p, "sparsity_warmup", type=float, default=0.1)
    _opt(p, "lr_schedule", default="linear", choices=("linear", "constant"))
    _opt(p, "lr_warmup_steps", type=int, default=0)
    _opt(p, "seed", type=int, default=0)
    _opt(p, "eval_every", type=int, default=0)
    _opt(p, "eval_max_examples", type=int, default=128)
    # choices: a misspelt mode is an argparse error naming the valid ones, not silently dropped
    _opt(p, "eval_modes", nargs="+", default=None, choices=INFERENCE_MODES)
    _opt(p, "final_eval_modes", nargs="+", default=None, choices=INFERENCE_MODES,
         help="modes of the final evaluation (default: all supported)")
    _opt(p, "no_final_eval", action="store_true", help="skip the evaluation on the test split at the end")
    _opt(p, "checkpoint_dir", default=None, help="run folder (default checkpoints/<method>_<domain>[_<attribute>])")
    _opt(p, "checkpoint_every", type=int, default=0)
    _opt(p, "max_steps", type=int, default=None)
    _opt(p, "max_examples", type=int, default=None, help="cap on training examples kept after filtering (per domain with --domain all)")
    _opt(p, "max_test_examples", type=int, default=None, help="cap on test examples (per domain with --domain all)")
    _opt(p, "data_dir", default=None, help="RAVEL folder (default ../shared/ravel or $HYPERDAS_FAST_RAVEL_DIR)")
    _opt(p, "label_mode", default="data", choices=("data", "model"),
         help="'model': the model's own greedy answers become the labels")
    _opt(p, "no_filter", action="store_true", help="skip knowledge filtering")
    _opt(p, "resume", nargs="?", const=True, default=False, help="resume from the newest checkpoint (or this path)")
    _opt(p, "overwrite", action="store_true",
         help="replace an earlier run in the run folder (without it, a new run there is refused)")
    _opt(p, "tensorboard", action="store_true")
    _opt(p, "device", default=None)
    _opt(p, "dtype", default=None)
    _opt(p, "backend", default="auto")
    _opt(p, "no_progress", action="store_true")


def default_run_dir(method: str, domain: str, attribute: Optional[str]) -> Path:
    name = f"{method}_{domain}" + (f"_{attribute}" if attribute else "")
    return Path("checkpoints") / name


def build_method(method: str, model=None, layer: int = 15, feature_dim: int = 128, num_hypernet_layers: int = 2,
                 subspace: str = "reflect", dtype=None, device=None, backend: str = "auto", tokenizer=None,
                 seed=None, selector: str = "rotary", hypernet_rotary: bool = False, hypernet_qk_norm: bool = True):
    """``seed``: seeds the random initialisation (None: torch's global RNG). ``selector``:
    HyperDAS only (MDAS has no position selector)."""
    if method == "hyperdas":
        from .models.hyperdas import HyperDAS

        return HyperDAS(model, layer=layer, feature_dim=feature_dim, num_hypernet_layers=num_hypernet_layers,
                        subspace=subspace, dtype=dtype, device=device, backend=backend, tokenizer=tokenizer,
                        seed=seed, selector=selector, hypernet_rotary=hypernet_rotary,
                        hypernet_qk_norm=hypernet_qk_norm)
    if method == "mdas":
        from .models.mdas import MDAS

        return MDAS(model, layer=layer, feature_dim=feature_dim, dtype=dtype, device=device, backend=backend,
                    tokenizer=tokenizer, seed=seed)
    raise ValueError(f"method must be one of {METHODS}; got {method!r}")


def _train_config(args, domain: str, run_dir: Path):
    from .data import ravel
    from .training.trainer import TrainConfig

    return TrainConfig(
        # absolute: the stored path must still work when evaluate.py runs from another directory
        data_dir=str(ravel.resolve_data_dir(args.data_dir)),
        domain=domain, attribute=args.attribute, epochs=args.epochs, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, lr=args.lr, basis_lr=args.basis_lr,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, causal_weight=args.causal_weight,
        isolation_weight=args.isolation_weight, sparsity_start=args.sparsity_start, sparsity_end=args.sparsity_end,
        sparsity_warmup=args.sparsity_warmup, lr_schedule=args.lr_schedule, lr_warmup_steps=args.lr_warmup_steps,
        seed=args.seed, eval_every=args.eval_every, eval_max_examples=args.eval_max_examples,
        eval_modes=tuple(args.eval_modes) if args.eval_modes else None, final_eval=not args.no_final_eval,
        final_eval_modes=tuple(args.final_eval_modes) if args.final_eval_modes else None,
        checkpoint_dir=str(run_dir), checkpoint_every=args.checkpoint_every, max_steps=args.max_steps,
        max_examples=args.max_examples, max_test_examples=args.max_test_examples, filter=not args.no_filter,
        label_mode=args.label_mode, tensorboard=args.tensorboard, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def run_train(args) -> Dict[str, Any]:
    from .data import ravel
    from .training.trainer import Trainer

    _check_device(args.device)
    ravel.resolve_data_dir(args.data_dir)  # fail early with the override hint
    splits = ravel.available_splits(args.data_dir)
    domains = ravel._resolve_domains(args.domain, splits, args.data_dir)
    if args.attribute is not None:
        for d in domains:
            ravel._resolve_attributes(d, args.attribute, splits)
    base_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_run_dir(args.method, args.domain, args.attribute)
    # MDAS learns one subspace per domain: "all" trains one model per domain.
    jobs = [(d, base_dir / d) for d in domains] if (args.method == "mdas" and len(domains) > 1) else [(args.domain, base_dir)]
    dtype = _dtype(args.dtype)
    summaries = {}
    target = tokenizer = None
    for domain, run_dir in jobs:
        wrapper = build_method(args.method, target if target is not None else args.model, args.layer, args.feature_dim,
                               args.num_hypernet_layers, args.subspace, dtype, args.device, args.backend, tokenizer,
                               # same --seed, same initial weights (and, per domain, the same as alone)
                               seed=args.seed, selector=args.selector, hypernet_rotary=args.hypernet_rotary,
                               hypernet_qk_norm=args.hypernet_qk_norm)
        target, tokenizer = wrapper.target, wrapper.tokenizer  # reuse the loaded target for the next domain
        result = Trainer(wrapper, _train_config(args, domain, run_dir)).train()
        ev = result.get("eval") or {}
        summaries[domain] = {"run_dir": str(run_dir), "steps": result["steps"],
                             "train_examples": result["train_examples"], "test_examples": result.get("test_examples"),
                             "eval": {m: v["overall"] for m, v in ev.items()}}
        print(json.dumps({"domain": domain, **summaries[domain]}, indent=2))
    return summaries


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperdas-train", description="Train HyperDAS or MDAS on RAVEL")
    add_train_args(parser)
    args = parser.parse_args(argv)
    return _guard(run_train, args)


# --------------------------------------------------------------------------- evaluate

def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    _opt(p, "model_path", required=True, help="run folder, its final/ folder, or a ckpt-*.safetensors file")
    _opt(p, "domain", default=None, help="default: the training domain")
    _opt(p, "attribute", default=None)
    _opt(p, "model", default=None, help="target model (default: the one recorded at training time)")
    _opt(p, "data_dir", default=None, help="RAVEL folder (default: $HYPERDAS_FAST_RAVEL_DIR, then the "
         "training run's, then ../shared/ravel)")
    _opt(p, "modes", nargs="+", default=None, help="inference modes (default: all the model supports)")
    _opt(p, "primary_mode", default=None, help="mode reported in the table (default: default / groundtruth for MDAS)")
    _opt(p, "max_examples", type=int, default=None,
         help="cap on test examples (after filtering; default: the training run's --max-test-examples, so that "
              "the test set is the one behind its results.json)")
    _opt(p, "label_mode", default=None, choices=("data", "model"))
    _opt(p, "no_filter", action="store_true")
    _opt(p, "seed", type=int, default=None, help="split seed (default: the training seed)")
    _opt(p, "batch_size", type=int, default=32)
    _opt(p, "out", default=None, help="output prefix for <out>.json and <out>.md (default "
         "<run>/eval_<domain>[_<attribute>], plus _<checkpoint name> for a ckpt-*.safetensors file)")
    _opt(p, "device", default=None)
    _opt(p, "no_progress", action="store_true")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{what} {path} is corrupt (not valid JSON): {exc}") from exc


def load_trained(model_path, model=None, device=None):
    """(wrapper, run_config) from a run folder, its final/ folder or a training checkpoint file."""
    from .models.hyperdas import CONFIG_NAME as HD_CONFIG
    from .models.mdas import CONFIG_NAME as MDAS_CONFIG, MDAS
    from .models.hyperdas import HyperDAS
    from .training import checkpoint as ckpt

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"--model_path not found: {path}")
    run_cfg: Dict[str, Any] = {}
    for candidate in (path, path.parent, path.parent.parent):
        f = candidate / "train_config.json"
        if f.is_file():
            run_cfg = _read_json(f, "run config")
            break
    kwargs = {"device": device} if device else {}
    final = path if (path / HD_CONFIG).is_file() or (path / MDAS_CONFIG).is_file() else path / "final"
    if path.is_dir() and ((final / HD_CONFIG).is_file() or (final / MDAS_CONFIG).is_file()):
        cls = HyperDAS if (final / HD_CONFIG).is_file() else MDAS
        for name in (HD_CONFIG, MDAS_CONFIG):
            if (final / name).is_file():
                _read_json(final / name, "model config")
        try:
            return cls.load(final, model=model, **kwargs), run_cfg
        except (FileNotFoundError, ValueError):
            raise
        except Exception as exc:  # safetensors / torch errors on damaged files
            raise ValueError(f"checkpoint {final} is corrupt or unreadable: {exc}") from exc
    # a training checkpoint (file, or the newest one in a folder)
    ckpt_file = path if path.is_file() else ckpt.latest_checkpoint(path)
    if ckpt_file is None:
        raise FileNotFoundError(f"no model under {path}: expected final/ (hyperdas_config.json or mdas_config.json) "
                                "or ckpt-*.safetensors")
    _, state = ckpt.read_checkpoint(ckpt_file)  # CheckpointError (ValueError) if damaged
    if not run_cfg:
        raise FileNotFoundError(f"{ckpt_file} needs the run's train_config.json beside it to rebuild the model")
    # The options the checkpoint itself records win (train_config.json of a bare-model run
    # had none before they were recorded there too).
    mc = (state.get("trainer") or {}).get("model_config") or run_cfg.get("model_config") or {}
    method = str(run_cfg.get("method", "HyperDAS")).lower()
    name = model if model is not None else run_cfg.get("model")
    from .models.default_model import DEFAULT_MODEL_NAME
    from .models.hyperdas import LEGACY_SELECTOR

    if name in ("", DEFAULT_MODEL_NAME):
        name = None
    wrapper = build_method(method, name, mc.get("layer", 15), mc.get("feature_dim", 128),
                           mc.get("num_hypernet_layers", 2), mc.get("subspace", "reflect"), device=device,
                           selector=mc.get("selector", LEGACY_SELECTOR),
                           hypernet_rotary=bool(mc.get("hypernet_rotary", False)),
                           hypernet_qk_norm=bool(mc.get("hypernet_qk_norm", False)))
    ckpt.load_checkpoint(ckpt_file, wrapper.model, restore_rng=False)
    return wrapper, run_cfg


def run_evaluate(args) -> Dict[str, Any]:
    from .data import ravel
    from .evaluation.metrics import evaluate
    from .evaluation.tables import atomic_write_json, method_title, with_extension, write_table
    from .training.trainer import method_name

    _check_device(args.device)
    wrapper, run_cfg = load_trained(args.model_path, args.model, args.device)
    train_cfg = run_cfg.get("train", {})
    domain = args.domain or train_cfg.get("domain") or "city"
    # default: what the model was trained on (the training attribute when the domain is the training domain)
    attribute = args.attribute
    if attribute is None and domain == train_cfg.get("domain"):
        attribute = train_cfg.get("attribute")
    label_mode = args.label_mode or train_cfg.get("label_mode", "data")
    seed = args.seed if args.seed is not None else train_cfg.get("seed", 0)
    # the environment variable beats the stored path: it is how to point a run at the data on another machine
    data_dir = args.data_dir or os.environ.get(ravel.ENV_VAR) or train_cfg.get("data_dir")
    do_filter = not args.no_filter and train_cfg.get("filter", True)
    max_examples = args.max_examples if args.max_examples is not None else train_cfg.get("max_test_examples")
    records = ravel.load_dataset(domain, attribute, "test", data_dir, model=wrapper.target, tokenizer=wrapper.tokenizer,
                                 filter=do_filter, label_mode=label_mode, max_examples=max_examples, seed=seed,
                                 progress=not args.no_progress)
    net = wrapper.model
    from .models.selector import INFERENCE_MODES

    supported = tuple(getattr(net, "supported_inference_modes", INFERENCE_MODES))
    modes = tuple(args.modes) if args.modes else supported
    bad = [m for m in modes if m not in INFERENCE_MODES]
    if bad:
        raise ValueError(f"--modes must be among {INFERENCE_MODES}; got {bad}")
    metrics = evaluate(net, records, wrapper.collator, modes=modes, batch_size=args.batch_size,
                       progress=not args.no_progress)
    method = method_name(wrapper.model)
    primary = args.primary_mode or ("groundtruth" if method == "MDAS" else ("default" if "default" in metrics else modes[0]))
    if primary not in metrics:
        raise ValueError(f"--primary_mode {primary!r} was not evaluated (modes: {list(metrics)})")
    mc = getattr(wrapper, "config", {}) or {}
    result = {"method": method_title(method), "model": getattr(wrapper, "model_name", None), "domain": domain,
              "attribute": attribute, "primary_mode": primary, "metrics": metrics, "layer": mc.get("layer"),
              "feature_dim": mc.get("feature_dim"), "label_mode": label_mode,
              "train_examples": run_cfg.get("train_examples"), "test_examples": len(records),
              "model_path": str(args.model_path)}
    base = Path(args.model_path)
    run_dir = base.parent if base.is_file() or base.name == "final" else base
    stem = f"eval_{domain}" + ("" if attribute is None else f"_{attribute}")
    if base.is_file():  # a training checkpoint: its own file, not the final model's
        stem += f"_{base.stem}"
    out = Path(args.out) if args.out else run_dir / stem
    atomic_write_json(with_extension(out, ".json"), result)
    write_table([result], out.parent / (out.name + "_table"),
                title=f"{method_title(method)} on {domain}, disentangle % ({primary})")
    summary = {m: v["overall"] for m, v in metrics.items()}
    print(json.dumps({"results": str(with_extension(out, ".json")), "overall": summary}, indent=2))
    return result


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperdas-evaluate", description="Evaluate a trained HyperDAS / MDAS model on RAVEL")
    add_evaluate_args(parser)
    args = parser.parse_args(argv)
    return _guard(run_evaluate, args)


# --------------------------------------------------------------------------- table

def add_table_args(p: argparse.ArgumentParser) -> None:
    from .models.selector import INFERENCE_MODES

    p.add_argument("results", nargs="+", help="results JSON files (results.json / eval_*.json)")
    _opt(p, "out", default="results/table", help="output prefix: <out>.json and <out>.md")
    _opt(p, "title", default=None)
    _opt(p, "metric", default="disentangle", choices=("disentangle", "causal", "isolation"))
    _opt(p, "mode", default=None, choices=INFERENCE_MODES, help="inference mode to report for the results that "
         "evaluated it (e.g. global_argmax); the others keep their primary mode (default: every result's primary mode)")


def run_table(args) -> Dict[str, Any]:
    from .evaluation.tables import load_results, markdown_table, build_table, write_table

    results = load_results(args.results)
    paths = write_table(results, args.out, title=args.title, metric=args.metric, mode=args.mode)
    print(markdown_table(build_table(results, args.metric, args.mode), args.title))
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- main

def _guard(fn, args) -> int:
    """Run ``fn(args)``; user errors become one line on stderr and exit status 2."""
    try:
        fn(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperdas-fast", description="HyperDAS: train, evaluate, tabulate, intervene")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="train HyperDAS or MDAS on RAVEL"))
    add_evaluate_args(sub.add_parser("evaluate", help="evaluate a trained model on a RAVEL test split"))
    add_table_args(sub.add_parser("table", help="the paper's results table from results JSON files"))
    # ---- intervene: implemented in hyperdas_fast/sweep.py (another module's owner) ----
    p_int = sub.add_parser("intervene", help="run interventions (see hyperdas_fast.sweep)", add_help=False)
    p_int.add_argument("intervene_args", nargs=argparse.REMAINDER)
    # ---- end intervene ----
    args, extra = parser.parse_known_args(argv)
    if args.command == "intervene":
        # Lazy import: hyperdas_fast.sweep.main_intervene(argv_list) parses its own options.
        try:
            from .sweep import main_intervene
        except ModuleNotFoundError as exc:
            if exc.name != "hyperdas_fast.sweep":
                raise
            print("error: the intervene subcommand needs hyperdas_fast/sweep.py, which is not installed", file=sys.stderr)
            return 2
        rc = main_intervene(list(extra) + list(args.intervene_args))
        return int(rc or 0)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "train":
        return _guard(run_train, args)
    if args.command == "evaluate":
        return _guard(run_evaluate, args)
    if args.command == "table":
        return _guard(run_table, args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
