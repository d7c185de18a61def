"""pyvene drop-in interventions: same math, same state dicts, same model outputs.

Tests marked ``needs_pyvene`` skip only when pyvene is not importable; the rest check the
drop-in classes against the formula and the native path without pyvene.
"""

import pytest
import torch

from hyperdas_fast.integrations import pyvene as hp

needs_pyvene = pytest.mark.skipif(
    not hp.PYVENE_AVAILABLE, reason=f"pyvene is not importable ({hp.PYVENE_IMPORT_ERROR}); {hp.INSTALL_HINT}"
)

if hp.PYVENE_AVAILABLE:
    import pyvene as pv


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two OpenMP threads competing with
    other processes made each SmolLM2 forward ~15x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

LAYER = 5
RANK = 8
CLASS_KWARGS = {
    "VanillaIntervention": {},
    "RotatedSpaceIntervention": {},
    "LowRankRotatedSpaceIntervention": {"low_rank_dimension": RANK},
    "BoundlessRotatedSpaceIntervention": {},
}


def _formula(base, source, basis, mask=None):
    """out = base + R diag(m) R^T (source - base) in float64."""
    base, source, basis = base.double(), source.double(), basis.double()
    coords = (source - base) @ basis
    if mask is not None:
        coords = coords * mask.double()
    return base + coords @ basis.t()


# ---------------------------------------------------------------- without pyvene needed


@pytest.mark.parametrize("name", ["LowRankRotatedSpaceIntervention", "RotatedSpaceIntervention"])
def test_dropin_matches_formula(name):
    torch.manual_seed(0)
    dim = 32
    inter = getattr(hp, name)(embed_dim=dim, **CLASS_KWARGS[name])
    base, source = torch.randn(6, dim), torch.randn(6, dim)
    rotation = inter.rotate_layer.weight.detach()
    if name == "RotatedSpaceIntervention":
        inter.set_interchange_dim(7)
        rotation = rotation[:, :7]
    with torch.no_grad():
        out = inter(base, source)
    torch.testing.assert_close(out.double(), _formula(base, source, rotation), atol=1e-5, rtol=1e-5)
    # the rotation is cached while unchanged, and the cache follows a weight update
    with torch.no_grad():
        inter.rotate_layer.parametrizations.weight.original.mul_(0.5)
        out2 = inter(base, source)
    rotation2 = inter.rotate_layer.weight.detach()
    if name == "RotatedSpaceIntervention":
        rotation2 = rotation2[:, :7]
    torch.testing.assert_close(out2.double(), _formula(base, source, rotation2), atol=1e-5, rtol=1e-5)


def test_boundless_matches_formula():
    torch.manual_seed(1)
    dim = 24
    inter = hp.BoundlessRotatedSpaceIntervention(embed_dim=dim)
    inter.set_intervention_boundaries(0.3)
    inter.set_temperature(torch.tensor(2.0))
    base, source = torch.randn(3, 4, dim), torch.randn(3, 4, dim)
    pop = torch.arange(dim).double()
    mask = torch.sigmoid(pop / 2.0) * torch.sigmoid((0.3 * dim - pop) / 2.0)
    with torch.no_grad():
        out = inter(base, source)
    expected = _formula(base, source, inter.rotate_layer.weight.detach(), mask)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_lowrank_subspaces_are_a_per_example_mask():
    torch.manual_seed(2)
    dim = 16
    inter = hp.LowRankRotatedSpaceIntervention(embed_dim=dim, low_rank_dimension=4,
                                               subspace_partition=[[0, 2], [2, 4]])
    base, source = torch.randn(2, dim), torch.randn(2, dim)
    rotation = inter.rotate_layer.weight.detach()
    with torch.no_grad():
        out = inter(base, source, subspaces=[[0], [1]])
    expected = torch.stack([
        _formula(base[:1], source[:1], rotation[:, :2])[0],
        _formula(base[1:], source[1:], rotation[:, 2:])[0],
    ])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_vanilla_swaps_coordinates_without_touching_base():
    inter = hp.VanillaIntervention(embed_dim=8)
    base, source = torch.zeros(2, 3, 8), torch.ones(2, 3, 8)
    torch.testing.assert_close(inter(base, source), source)
    inter.set_interchange_dim(3)
    out = inter(base, source)
    assert out[..., :3].eq(1).all() and out[..., 3:].eq(0).all()
    out = inter(base, source, subspaces=[[1], [5, 6]])
    assert out[0, :, 1].eq(1).all() and out[0].sum() == 3
    assert out[1, :, 5:7].eq(1).all() and out[1].sum() == 6
    assert base.eq(0).all()


def test_gradients_reach_the_rotation():
    torch.manual_seed(3)
    inter = hp.LowRankRotatedSpaceIntervention(embed_dim=12, low_rank_dimension=3)
    base = torch.randn(4, 12, requires_grad=True)
    source = torch.randn(4, 12, requires_grad=True)
    inter(base, source).pow(2).sum().backward()
    original = inter.rotate_layer.parametrizations.weight.original
    assert original.grad is not None and original.grad.abs().sum() > 0
    assert base.grad is not None and source.grad is not None
    # compare with autograd through the float64 formula
    base2 = base.detach().double().requires_grad_()
    source2 = source.detach().double().requires_grad_()
    _formula(base2, source2, inter.rotate_layer.weight.detach()).pow(2).sum().backward()
    torch.testing.assert_close(source.grad.double(), source2.grad, atol=1e-4, rtol=1e-4)


def test_cached_rotation_follows_writes_through_data():
    """The rotation is cached between no-grad calls; a write through ``.data`` (manual SGD,
    weight editing) bumps no version counter and used to leave the old rotation in use."""
    torch.manual_seed(4)
    inter = hp.LowRankRotatedSpaceIntervention(embed_dim=12, low_rank_dimension=3)
    base, source = torch.randn(4, 12), torch.randn(4, 12)
    with torch.no_grad():
        inter(base, source)  # fills the cache
        inter.rotate_layer.parametrizations.weight.original.data.add_(0.5 * torch.randn(12, 3))
        expected = _formula(base.double(), source.double(), inter.rotate_layer.weight.double())
        torch.testing.assert_close(inter(base, source).double(), expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_value_error():
    inter = hp.LowRankRotatedSpaceIntervention(embed_dim=8, low_rank_dimension=2)
    with pytest.raises(ValueError, match="source"):
        inter(torch.randn(2, 8), torch.randn(3, 5))
    with pytest.raises(ValueError, match="subspace"):
        inter(torch.randn(2, 8), torch.randn(2, 8), subspaces=[[5], [0]])


# ---------------------------------------------------------------- against pyvene itself


@needs_pyvene
@pytest.mark.parametrize("name", list(CLASS_KWARGS))
def test_same_state_dict_and_outputs_as_pyvene(name):
    torch.manual_seed(4)
    dim = 48
    theirs = getattr(pv, name)(embed_dim=dim, **CLASS_KWARGS[name])
    ours = getattr(hp, name)(embed_dim=dim, **CLASS_KWARGS[name])
    assert isinstance(ours, getattr(pv, name))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)  # pyvene -> ours
    base, source = torch.randn(5, dim), torch.randn(5, dim)
    with torch.no_grad():
        expected = theirs(base.clone(), source.clone())
        got = ours(base, source)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    # ours -> pyvene: perturb ours, load it back into a fresh pyvene instance
    with torch.no_grad():
        for p in ours.parameters():
            if p.dtype.is_floating_point:
                p.add_(0.01)
    back = getattr(pv, name)(embed_dim=dim, **CLASS_KWARGS[name])
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)
    with torch.no_grad():
        torch.testing.assert_close(ours(base, source), back(base.clone(), source.clone()), atol=2e-5, rtol=1e-5)


@needs_pyvene
@pytest.mark.parametrize("name", list(CLASS_KWARGS))
def test_fallback_bases_have_pyvenes_state_dict(name):
    """Without pyvene the drop-ins stand on fallback bases: same keys, shapes and loading."""
    fallback = {"VanillaIntervention": hp._FallbackVanilla, "RotatedSpaceIntervention": hp._FallbackRotated,
                "LowRankRotatedSpaceIntervention": hp._FallbackLowRank,
                "BoundlessRotatedSpaceIntervention": hp._FallbackBoundless}[name]
    theirs = getattr(pv, name)(embed_dim=24, **CLASS_KWARGS[name])
    ours = fallback(embed_dim=24, **CLASS_KWARGS[name])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    if hasattr(ours, "rotate_layer"):
        torch.testing.assert_close(ours.rotate_layer.weight, theirs.rotate_layer.weight)


@needs_pyvene
@pytest.mark.parametrize("name", ["RotatedSpaceIntervention", "LowRankRotatedSpaceIntervention", "VanillaIntervention"])
def test_subspaces_like_pyvene(name):
    torch.manual_seed(5)
    dim = 20
    theirs = getattr(pv, name)(embed_dim=dim, **CLASS_KWARGS[name])
    ours = getattr(hp, name)(embed_dim=dim, **CLASS_KWARGS[name])
    ours.load_state_dict(theirs.state_dict())
    base, source = torch.randn(3, dim), torch.randn(3, dim)
    subspaces = [[0, 2]] * 3  # pyvene's fast path (same coordinates for every example)
    with torch.no_grad():
        torch.testing.assert_close(ours(base, source, subspaces=subspaces),
                                   theirs(base.clone(), source.clone(), subspaces=subspaces),
                                   atol=2e-5, rtol=1e-5)


@needs_pyvene
def test_gradients_match_pyvene():
    torch.manual_seed(6)
    theirs = pv.LowRankRotatedSpaceIntervention(embed_dim=16, low_rank_dimension=4)
    ours = hp.LowRankRotatedSpaceIntervention(embed_dim=16, low_rank_dimension=4)
    ours.load_state_dict(theirs.state_dict())
    base, source = torch.randn(3, 16), torch.randn(3, 16)
    target = torch.randn(3, 16)
    (theirs(base.clone(), source) - target).pow(2).sum().backward()
    (ours(base, source) - target).pow(2).sum().backward()
    g_theirs = theirs.rotate_layer.parametrizations.weight.original.grad
    g_ours = ours.rotate_layer.parametrizations.weight.original.grad
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-4, rtol=1e-4)


@needs_pyvene
def test_convert_keeps_state():
    theirs = pv.LowRankRotatedSpaceIntervention(embed_dim=16, low_rank_dimension=4)
    ours = hp.convert(theirs)
    assert type(ours) is hp.LowRankRotatedSpaceIntervention
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    base, source = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(base, source), theirs(base.clone(), source.clone()), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- on SmolLM2


@pytest.fixture(scope="module")
def ravel_batch(smollm2, ravel_dir):
    import datasets

    _, tok = smollm2
    rows = datasets.load_from_disk(str(ravel_dir / "city_country_test")).select(range(3))
    base = [r["input_prefix"] + r["input_suffix"] for r in rows]
    cf = [r["counterfactual_input_prefix"] + r["counterfactual_input_suffix"] for r in rows]
    base_pos = [len(tok(r["input_prefix"]).input_ids) - 1 for r in rows]
    cf_pos = [len(tok(r["counterfactual_input_prefix"]).input_ids) - 1 for r in rows]
    b = tok(base, return_tensors="pt", padding=True)
    s = tok(cf, return_tensors="pt", padding=True)
    return b, s, base_pos, cf_pos


@pytest.fixture(scope="module")
def plain_logits(smollm2, ravel_batch):
    model, _ = smollm2
    with torch.no_grad():
        return _last_logits(model(**ravel_batch[0]).logits, ravel_batch[0])


def _last_logits(logits, inputs):
    last = inputs["attention_mask"].sum(1) - 1
    return logits[torch.arange(logits.shape[0]), last]


def _config(cls, **extra):
    rep = {"layer": LAYER, "component": "block_output", "unit": "pos", "max_number_of_units": 1}
    rep.update(extra)
    return pv.IntervenableConfig(representations=[rep], intervention_types=cls)


@needs_pyvene
@pytest.mark.parametrize("name", ["LowRankRotatedSpaceIntervention", "RotatedSpaceIntervention", "VanillaIntervention"])
def test_smollm2_pyvene_dropin_native_agree(smollm2, ravel_batch, plain_logits, name):
    model, _ = smollm2
    base, source, base_pos, cf_pos = ravel_batch
    extra = {"low_rank_dimension": RANK} if name == "LowRankRotatedSpaceIntervention" else {}
    torch.manual_seed(7)
    theirs = pv.IntervenableModel(_config(getattr(pv, name), **extra), model)
    key = next(iter(theirs.interventions))
    state = theirs.interventions[key].state_dict()
    if name == "RotatedSpaceIntervention":
        theirs.interventions[key].set_interchange_dim(RANK)
    units = {"sources->base": ([[[p] for p in cf_pos]], [[[p] for p in base_pos]])}
    with torch.no_grad():
        expected = _last_logits(theirs(base, [source], units)[1].logits, base)
    assert (expected - plain_logits).abs().max() > 1e-2  # the intervention does something

    # pyvene's IntervenableModel with our class; for low rank also our IntervenableModel
    wrappers = [pv.IntervenableModel]
    if name == "LowRankRotatedSpaceIntervention":
        wrappers.append(hp.IntervenableModel)
    for wrapper in wrappers:
        ours = wrapper(_config(getattr(hp, name), **extra), model)
        ours.interventions[key].load_state_dict(state)
        if name == "RotatedSpaceIntervention":
            ours.interventions[key].set_interchange_dim(RANK)
        with torch.no_grad():
            got = _last_logits(ours(base, [source], units)[1].logits, base)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-4)

    if name == "VanillaIntervention":
        basis = None
    else:
        basis = theirs.interventions[key].rotate_layer.weight.detach()[:, :RANK]
    native = hp.das_interchange(model, base, source, base_pos, cf_pos, LAYER, basis)
    torch.testing.assert_close(native, expected, atol=2e-3, rtol=1e-4)
    if name == "LowRankRotatedSpaceIntervention":  # every hook was removed
        with torch.no_grad():
            torch.testing.assert_close(_last_logits(model(**base).logits, base), plain_logits)


@needs_pyvene
def test_smollm2_save_load_through_pyvene(smollm2, ravel_batch, tmp_path):
    model, _ = smollm2
    base, source, base_pos, cf_pos = ravel_batch
    units = {"sources->base": ([[[p] for p in cf_pos]], [[[p] for p in base_pos]])}
    ours = hp.IntervenableModel(_config(hp.LowRankRotatedSpaceIntervention, low_rank_dimension=RANK), model)
    ours.save(str(tmp_path / "saved"))
    loaded = pv.IntervenableModel.load(str(tmp_path / "saved"), model)
    key = next(iter(loaded.interventions))
    assert type(loaded.interventions[key]) is hp.LowRankRotatedSpaceIntervention
    # and the same binary into pyvene's own class
    theirs = pv.IntervenableModel(_config(pv.LowRankRotatedSpaceIntervention, low_rank_dimension=RANK), model)
    theirs.interventions[key].load_state_dict(torch.load(tmp_path / "saved" / f"intkey_{key}.bin"))
    with torch.no_grad():
        a = loaded(base, [source], units)[1].logits
        b = theirs(base, [source], units)[1].logits
    torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-4)


def test_length_groups_cover_rows_and_cut_padding():
    lengths = [8, 30, 9, 29, 8, 31, 10, 28]
    groups = hp.length_groups(lengths, overhead_tokens=8)
    assert sorted(i for g in groups for i in g) == list(range(8))
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert len(groups) == 2 and padded < 8 * 31
    assert hp.length_groups([5, 5, 5]) == [[0, 1, 2]]
    assert hp.length_groups([]) == []


def test_native_regrouped_equals_padded(smollm2, ravel_batch, monkeypatch):
    model, _ = smollm2
    base, source, base_pos, cf_pos = ravel_batch
    torch.manual_seed(8)
    basis = torch.linalg.qr(torch.randn(model.config.hidden_size, RANK))[0]
    calls = []
    real_groups = hp.length_groups

    def one_group_per_length(lengths, overhead_tokens=48):
        groups = real_groups(lengths, overhead_tokens=0)
        calls.append(groups)
        return groups

    monkeypatch.setattr(hp, "length_groups", one_group_per_length)
    grouped = hp.das_interchange(model, base, source, base_pos, cf_pos, LAYER, basis, regroup=True)
    assert all(len(groups) > 1 for groups in calls) and len(calls) == 2
    padded = hp.das_interchange(model, base, source, base_pos, cf_pos, LAYER, basis, regroup=False)
    full = hp.das_interchange(model, base, source, base_pos, cf_pos, LAYER, basis, logits_at="all")
    torch.testing.assert_close(grouped, padded, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(_last_logits(full, base), padded, atol=2e-3, rtol=1e-4)


def test_native_rejects_bad_arguments(smollm2, ravel_batch):
    model, _ = smollm2
    base, source, base_pos, cf_pos = ravel_batch
    with pytest.raises(ValueError, match="layer"):
        hp.das_interchange(model, base, source, base_pos, cf_pos, 99, None)
    with pytest.raises(ValueError, match="base_positions"):
        hp.das_interchange(model, base, source, base_pos[:2], cf_pos, LAYER, None)
    # left padding: the passes would read padding at "length - 1"
    left = {k: v.clone() for k, v in base.items()}
    left["attention_mask"] = left["attention_mask"].flip(1)
    assert bool((left["attention_mask"][:, 0] == 0).any())
    with pytest.raises(ValueError, match="base_inputs must be right padded"):
        hp.das_interchange(model, left, source, base_pos, cf_pos, LAYER, None)


@needs_pyvene
def test_smollm2_dropin_model_cuts_source_forward_and_trains_like_pyvene(smollm2, ravel_batch):
    """Our IntervenableModel runs the source only up to the intervened block; training
    through it gives pyvene's gradients for the rotation."""
    model, _ = smollm2
    base, source, base_pos, cf_pos = ravel_batch
    units = {"sources->base": ([[[p] for p in cf_pos]], [[[p] for p in base_pos]])}
    torch.manual_seed(9)
    theirs = pv.IntervenableModel(_config(pv.LowRankRotatedSpaceIntervention, low_rank_dimension=RANK), model)
    ours = hp.IntervenableModel(_config(hp.LowRankRotatedSpaceIntervention, low_rank_dimension=RANK), model)
    key = next(iter(theirs.interventions))
    ours.interventions[key].load_state_dict(theirs.interventions[key].state_dict())
    calls = {"n": 0}
    last = model.model.layers[-1]
    original_forward = last.forward

    def counting_forward(*args, **kwargs):  # pyvene removes every forward hook of the model
        calls["n"] += 1
        return original_forward(*args, **kwargs)

    last.forward = counting_forward
    grads = []
    try:
        for intervenable, expected_calls in ((theirs, 2), (ours, 1)):
            calls["n"] = 0
            logits = _last_logits(intervenable(base, [source], units)[1].logits, base)
            assert calls["n"] == expected_calls  # pyvene: source + base; ours: base only
            target = torch.zeros(logits.shape[0], dtype=torch.long)
            torch.nn.functional.cross_entropy(logits, target).backward()
            grads.append(intervenable.interventions[key].rotate_layer.parametrizations.weight.original.grad)
    finally:
        del last.forward
    assert all(p.grad is None for p in model.parameters())  # the model itself stays frozen
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)
