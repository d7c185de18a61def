"""One HyperDAS training step: this library vs a faithful re-implementation of the original pipeline.

Both pipelines share the *same* parameter modules (hypernetwork, selector, subspace) and
the same frozen target (the embedded SmolLM2-135M-Instruct by default), batch and
optimizer (AdamW, basis group separate, grad clip 4.0). They differ only in how the step
is computed:

original (as the paper's code does it)
  - four full HF forwards of the target (output_hidden_states=True, full logits):
    base and counterfactual for the hypernetwork, the counterfactual again for the
    layer-L states, and the intervened base run with a forward pre-hook on block L;
  - position selector on the concatenated pair tensor [B, S, T, 2d] (q_combine, k_proj),
    rotary embeddings on the flattened key list;
  - intervention: einsum mix [B, S, T, d], dense [B, d, d] Householder, patch applied at
    every position; the orthogonal parametrization read three times;
  - cross-entropy over the full [B, T, V] logits;
  - the hypernetwork's cross-attention as HF-style code writes it (a normed copy of the
    keys per sub-layer, K/V repeated to every query head), same weights.
ours
  - HyperDASModel.forward(batch, logits_at="labels"): one base forward (prefix reused),
    one counterfactual forward, blocks L..N-1 once more, factored selector, one read of
    the basis, ops.interchange, LM head only at the label positions.

Measurements
  - time: median wall time of a full step (forward, loss, backward, clip, AdamW step),
    the two pipelines alternating step by step in one process after a warm-up step each;
  - peak memory: in a fresh subprocess per pipeline, a sampling thread reads glibc's
    mallinfo2() (bytes of live heap + mmapped blocks, i.e. every CPU tensor) every
    ~0.2 ms during the measured steps; reported is the peak above the level just before
    the step (after a warm-up step, so optimizer state already exists). The same
    subprocess also reports the ru_maxrss increase over the whole run, for reference.

Usage: python benchmarks/bench_training_step.py [--batch 16] [--steps 3] [--threads 1] [--device cpu|cuda]
Writes benchmarks/results/training_step_<device>.json (atomically). On a GPU the peak memory
is torch.cuda.max_memory_allocated above the level at step start.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hyperdas_fast.atomic import publish  # noqa: E402
from hyperdas_fast.models.hypernetwork import head_norm, rms_unit  # noqa: E402
from hyperdas_fast.models.hyperdas import HyperDASModel  # noqa: E402
from hyperdas_fast.models.selector import selector_weights_reference  # noqa: E402
from hyperdas_fast.training.losses import hyperdas_loss  # noqa: E402

CITIES = [("Vienna", "Austria"), ("Paris", "France"), ("Tokyo", "Japan"), ("Cairo", "Egypt"),
          ("Lima", "Peru"), ("Oslo", "Norway"), ("Madrid", "Spain"), ("Rome", "Italy"),
          ("Berlin", "Germany"), ("Dublin", "Ireland"), ("Athens", "Greece"), ("Lisbon", "Portugal"),
          ("Warsaw", "Poland"), ("Nairobi", "Kenya"), ("Hanoi", "Vietnam"), ("Ottawa", "Canada")]


def make_records(batch: int):
    records = []
    for i in range(batch):
        city, _ = CITIES[i % len(CITIES)]
        other, country = CITIES[(i + 5) % len(CITIES)]
        records.append({
            "base_prompt": f"Here is a short geography quiz about famous capitals. The city {city} is a capital in the country of",
            "counterfactual_prompt": f"Travel notes from last summer: I spent two weeks in {other}, and the food there was great",
            "concept": "the country of the city",
            "label": country,
            "is_causal": i % 4 != 3,
        })
    return records


# ---------------------------------------------------------------------------
# The original pipeline, re-implemented faithfully on the same parameters.
# ---------------------------------------------------------------------------
def original_cross_attention(xattn, hidden, keys_unit, key_mask):
    """The same cross-attention written as HF-style code does: a normed copy of the keys per
    sub-layer, K/V projected from it, and K/V repeated to every query head (repeat_kv). The
    target's q/k norms (Qwen3), where ours copied them, apply here too: the same function."""
    batch, length, _ = hidden.shape
    q = head_norm(xattn.q_norm, xattn.q_proj(xattn.norm(hidden)), xattn.num_heads)
    q = q.view(batch, length, xattn.num_heads, xattn.head_dim).transpose(1, 2)
    keys = keys_unit * xattn.key_scale
    k = head_norm(xattn.k_norm, xattn.k_proj(keys), xattn.num_kv_heads)
    k = k.view(batch, -1, xattn.num_kv_heads, xattn.head_dim).transpose(1, 2)
    v = xattn.v_proj(keys).view(batch, -1, xattn.num_kv_heads, xattn.head_dim).transpose(1, 2)
    rep = xattn.num_heads // xattn.num_kv_heads
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    return hidden + xattn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def original_hypernet(model: HyperDASModel, concept_ids, concept_mask, base_keys, base_kmask, src_keys, src_kmask):
    """HyperNetwork.forward with the HF-style cross-attention above (same parameters)."""
    from hyperdas_fast.models.adapters import additive_mask

    hn, ad = model.hypernet, model.adapter
    hidden = ad.embed(concept_ids)
    seq = concept_ids.shape[1]
    pos = torch.arange(seq, device=concept_ids.device).unsqueeze(0)
    mask = additive_mask(concept_mask, seq, seq, hidden.dtype, hidden.device)
    pos_emb = ad.position_embeddings(hidden, pos)
    base_unit, src_unit = rms_unit(base_keys), rms_unit(src_keys)
    for block, xb, xs in zip(hn.blocks, hn.base_xattn, hn.source_xattn):
        hidden = ad.block_self_attention(block, hidden, mask, pos, pos_emb)
        hidden = original_cross_attention(xb, hidden, base_unit, base_kmask)
        hidden = original_cross_attention(xs, hidden, src_unit, src_kmask)
        hidden = ad.block_mlp(block, hidden)
    return hn.final_norm(hidden)


def original_forward(model: HyperDASModel, batch):
    """Returns (logits [B, T, V], weights [B, S+1, T]) the way the original code computes them."""
    target, L = model.target, model.layer
    base_ids, base_am = batch["base_input_ids"], batch["base_attention_mask"]
    src_ids, src_am = batch["source_input_ids"], batch["source_attention_mask"]
    with torch.no_grad():  # forwards 1 and 2: hidden states of all layers for the hypernetwork
        base_out = target(input_ids=base_ids, attention_mask=base_am, output_hidden_states=True)
        src_out = target(input_ids=src_ids, attention_mask=src_am, output_hidden_states=True)
        base_stack = torch.stack(base_out.hidden_states, dim=2)  # [B, T, L+1, d]
        src_stack = torch.stack(src_out.hidden_states, dim=2)
    B, T, NL, d = base_stack.shape
    S = src_stack.shape[1]
    base_keys = base_stack.reshape(B, T * NL, d)
    src_keys = src_stack.reshape(B, S * NL, d)
    # keys: the base prompt's tokens, not the label tokens the collator appends (the original
    # masks those too; HyperDASModel.encode uses the same rule)
    inter = batch["base_intervention_mask"].bool() & base_am.bool()
    key_tokens = inter | (~inter.any(dim=1, keepdim=True) & base_am.bool())
    base_kmask = key_tokens.unsqueeze(-1).expand(B, T, NL).reshape(B, T * NL)
    src_kmask = src_am.bool().unsqueeze(-1).expand(B, S, NL).reshape(B, S * NL)
    hidden = original_hypernet(model, batch["concept_input_ids"], batch["concept_attention_mask"],
                               base_keys, base_kmask, src_keys, src_kmask)
    last = batch["concept_attention_mask"].sum(1) - 1
    query = hidden[torch.arange(B, device=hidden.device), last]
    with torch.no_grad():  # forward 3: the counterfactual again, for its layer-L states
        src_L = target(input_ids=src_ids, attention_mask=src_am, output_hidden_states=True).hidden_states[L]
    base_L = base_out.hidden_states[L]
    # Selector on the [B, S, T, 2d] pair tensor (with the rotary positions of the flattened
    # key list when the model's selector has them, as the original's does).
    weights = selector_weights_reference(model.selector, query, base_L, src_L, inter, src_am.bool(), query_pos=last)
    # Subspace: the orthogonal parametrization is read three times.
    _, reflect, mask = model.subspace(query)
    bases = [model.subspace.basis() for _ in range(3)]

    def intervention(base):
        weighted = torch.einsum("bst,bsd->bstd", weights[:, :S, :], src_L)  # [B, S, T, d]
        mix = weighted.sum(dim=1) + weights[:, S, :].unsqueeze(-1) * base
        if reflect is not None:
            eye = torch.eye(d, dtype=base.dtype, device=base.device)
            householder = eye.unsqueeze(0) - 2.0 * torch.einsum("bi,bj->bij", reflect, reflect)  # [B, d, d]
            rots = [householder @ r for r in bases]
        else:
            rots = [r.unsqueeze(0).expand(B, -1, -1) for r in bases]
        rotated = mix @ rots[0] - base @ rots[1]
        if mask is not None:
            rotated = rotated * (mask.unsqueeze(1) if mask.dim() == 2 else mask)
        return base + rotated @ rots[2].transpose(1, 2)

    def hook(module, args, kwargs):
        return (intervention(args[0]),) + tuple(args[1:]), kwargs

    handle = model.adapter.blocks[L].register_forward_pre_hook(hook, with_kwargs=True)
    try:  # forward 4: the intervened base run, full model, full logits
        logits = target(input_ids=base_ids, attention_mask=base_am).logits
    finally:
        handle.remove()
    return logits, weights


def original_loss(logits, labels, is_causal, weights, sparsity_coef, causal_weight=3.5, isolation_weight=0.5):
    """CE over the full [B*T, V] logits (ignore_index), split by causal/isolation, + sparsity."""
    B, T, V = logits.shape
    tok = F.cross_entropy(logits.reshape(B * T, V), labels.reshape(B * T), ignore_index=-100, reduction="none").view(B, T)
    valid = labels != -100
    causal = is_causal.bool().unsqueeze(1) & valid
    iso = (~is_causal.bool()).unsqueeze(1) & valid
    c = (tok * causal).sum() / causal.sum().clamp_min(1)
    i = (tok * iso).sum() / iso.sum().clamp_min(1)
    # the original's reduction: the mass above 1 summed over an example's counterfactual
    # tokens, averaged over examples (as hyperdas_loss does since 1c20300)
    sparsity = F.relu(weights[:, :-1, :].sum(-1) - 1).sum(-1).mean()
    return causal_weight * c + isolation_weight * i + sparsity_coef * sparsity


# ---------------------------------------------------------------------------
def build(args):
    from hyperdas_fast.data.collate import HyperDASCollator
    from hyperdas_fast.models.default_model import load_model

    torch.manual_seed(0)
    if args.random_init:
        # Real shapes, random weights: step time does not depend on the weights, and a
        # config + tokenizer folder (a few MB) travels where the weights cannot.
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from hyperdas_fast.models.default_model import resolve_model_path

        path = resolve_model_path(args.model)
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        target = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        target = target.to(args.device).eval()
    else:
        target, tok = load_model(args.model, device=args.device)
    model = HyperDASModel(target, layer=args.layer, feature_dim=args.feature_dim,
                          num_hypernet_layers=args.hypernet_layers, subspace=args.subspace)
    batch = {k: v.to(args.device) for k, v in HyperDASCollator(tok)(make_records(args.batch)).items()}
    opt = torch.optim.AdamW(model.parameter_groups(lr=4e-5, basis_lr=1e-3))
    return model, batch, opt


def make_step(kind, model, batch, opt, sparsity_coef=0.15):
    def step():
        if kind == "ours":
            out = model(batch, logits_at="labels")
            loss, _ = hyperdas_loss(out.logits, batch["labels"], batch["is_causal"], out.weights,
                                    sparsity_coef=sparsity_coef)
        else:
            logits, weights = original_forward(model, batch)
            loss = original_loss(logits, batch["labels"], batch["is_causal"], weights, sparsity_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 4.0)
        opt.step()
        return float(loss.detach())
    return step


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def live():
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    return live


def memory_worker(args):
    """Subprocess: peak live heap above the pre-step level during ``args.steps`` steps."""
    torch.set_num_threads(args.threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, batch, opt = build(args)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = make_step(args.worker, model, batch, opt)
    step()  # warm-up: optimizer state allocated
    if args.device.startswith("cuda"):
        peaks = []
        for _ in range(args.steps):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        print(json.dumps({"peak_step_bytes": peaks, "peak_step_bytes_max": max(peaks),
                          "source": "torch.cuda.max_memory_allocated minus memory_allocated at step start"}))
        return
    live = _heap_reader()
    peaks = []
    for _ in range(args.steps):
        base = live()
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                value = live()
                if value > peak[0]:
                    peak[0] = value
                time.sleep(0.0002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        step()
        stop.set()
        thread.join()
        peaks.append(peak[0] - base)
    rss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_step_bytes": peaks, "peak_step_bytes_max": max(peaks),
                      "maxrss_after_build_kib": rss_built, "maxrss_end_kib": rss_end,
                      "maxrss_increase_over_steps_kib": rss_end - rss_built, "maxrss_start_kib": rss0}))


def git_commit():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import git_commit as _git_commit

    return _git_commit()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="target model (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--feature-dim", type=int, default=128)
    parser.add_argument("--hypernet-layers", type=int, default=2)
    parser.add_argument("--subspace", default="reflect")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per pipeline")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared 2-core machine: 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU: memory from torch.cuda peak stats)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/training_step_<device>.json")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights of --model's shape (needs only its config and tokenizer files)")
    parser.add_argument("--worker", choices=["ours", "original"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_worker(args)
        return
    torch.set_num_threads(args.threads)
    started = time.time()
    model, batch, opt = build(args)
    steps = {k: make_step(k, model, batch, opt) for k in ("ours", "original")}
    # Same starting point: check the two pipelines agree on the first loss (params are shared).
    with torch.no_grad():
        out = model(batch, logits_at="labels")
        ours_loss, _ = hyperdas_loss(out.logits, batch["labels"], batch["is_causal"], out.weights, sparsity_coef=0.15)
        logits, weights = original_forward(model, batch)
        orig_loss = original_loss(logits, batch["labels"], batch["is_causal"], weights, 0.15)
        del logits, weights, out
    times = {"ours": [], "original": []}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for kind in ("ours", "original"):
        steps[kind]()  # warm-up
    for _ in range(args.steps):
        for kind in ("ours", "original"):
            sync()
            t0 = time.perf_counter()
            steps[kind]()
            sync()
            times[kind].append(time.perf_counter() - t0)
    del model, opt
    memory = {}
    for kind in ("ours", "original"):
        cmd = [sys.executable, __file__, "--worker", kind, "--batch", str(args.batch), "--layer", str(args.layer),
               "--feature-dim", str(args.feature_dim), "--hypernet-layers", str(args.hypernet_layers),
               "--subspace", args.subspace, "--steps", str(max(2, args.steps - 1)), "--threads", str(args.threads),
               "--device", args.device]
        if args.model:
            cmd += ["--model", args.model]
        if args.random_init:
            cmd.append("--random-init")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        memory[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: memory[k]["peak_step_bytes_max"] for k in memory}
    B, T = batch["base_input_ids"].shape
    result = {
        "benchmark": "training_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg_at_start": list(os.getloadavg())},
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "model": (args.model or "smollm2-135m-instruct (embedded)") + (" (random init)" if args.random_init else ""),
        "shapes": {"B": B, "T_base_with_label": T, "S": int(batch["source_input_ids"].shape[1]),
                   "C": int(batch["concept_input_ids"].shape[1]), "d": model_d(args), "layer": args.layer,
                   "feature_dim": args.feature_dim, "hypernet_layers": args.hypernet_layers,
                   "subspace": args.subspace, "dtype": "float32"},
        "first_loss": {"ours": float(ours_loss), "original": float(orig_loss)},
        "step_time_s": {"ours": times["ours"], "original": times["original"]},
        "median_step_time_s": med,
        "time_ratio_ours_over_original": med["ours"] / med["original"],
        "peak_step_memory_bytes": peak,
        "memory_ratio_ours_over_original": peak["ours"] / peak["original"],
        "memory_detail": memory,
        "method": ("time: median of alternating steps in one process after one warm-up step each; "
                   + ("memory: fresh subprocess per pipeline, torch.cuda.max_memory_allocated during each step "
                      "after a warm-up step, minus memory_allocated at step start"
                      if args.device.startswith("cuda") else
                      "memory: fresh subprocess per pipeline, glibc mallinfo2 (live heap + mmapped bytes) sampled "
                      "every ~0.2 ms during each step after a warm-up step, peak minus the level at step start")),
        "targets": {"time_ratio_max": 0.5, "memory_ratio_max": 0.5},
        "wall_s": time.time() - started,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"training_step_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".training_step.", suffix=".json", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    publish(tmp, out)
    print(json.dumps({k: result[k] for k in ("median_step_time_s", "time_ratio_ours_over_original",
                                             "peak_step_memory_bytes", "memory_ratio_ours_over_original",
                                             "first_loss")}, indent=2))


def model_d(args):
    from transformers import AutoConfig

    from hyperdas_fast.models.default_model import resolve_model_path

    return int(AutoConfig.from_pretrained(resolve_model_path(args.model)).hidden_size)


if __name__ == "__main__":
    main()
