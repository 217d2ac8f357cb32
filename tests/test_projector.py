"""CCAMProjector (docs/reference.md §4) against the float64 functional oracle, its eval-mode query side,
dropout, state_dict names, CCAMConfig and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import ccam_kernels
from ccam_kernels import CCAMConfig, CCAMProjector

from conftest import rel_err
from oracle import projector_oracle

SMALL = dict(
    num_query=37, hidden_size=64, cross_hidden_size=24, num_heads=4, num_key_value_heads=2,
    intermediate_size=48, output_size=40,
)
SPLITS = [3, 1, 5]
P = 7


def make_config(**changes) -> CCAMConfig:
    return CCAMConfig(**{**SMALL, "attention_dropout": 0.0, "dropout": 0.0, **changes})


def randomize_(proj: CCAMProjector) -> CCAMProjector:
    """Random values in every parameter (norm weights too), so each one is checked."""
    with torch.no_grad():
        for name, p in proj.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name == "query":
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return proj


def make_projector(backend="torch", dtype=torch.float32, **changes) -> CCAMProjector:
    return randomize_(CCAMProjector(make_config(**changes), backend=backend)).to(dtype)


def packed_features(dtype=torch.float32, splits=SPLITS, requires_grad=False):
    x = torch.randn(sum(splits), P, SMALL["cross_hidden_size"], dtype=dtype)
    return x.requires_grad_(requires_grad)


def oracle_of(proj, features, split_sizes=None):
    state = {k: v.detach() for k, v in proj.state_dict().items()}
    with torch.no_grad():
        return projector_oracle(state, proj.config, features.detach(), split_sizes)


EXPECTED_KEYS = {
    "query",
    "query_norm.weight", "query_norm.bias",
    "feature_norm.weight", "feature_norm.bias",
    "attn.q_proj.weight", "attn.q_proj.bias",
    "attn.k_proj.weight", "attn.k_proj.bias",
    "attn.v_proj.weight", "attn.v_proj.bias",
    "attn.o_proj.weight", "attn.o_proj.bias",
    "mlp_norm.weight", "mlp_norm.bias",
    "mlp.gate_proj.weight", "mlp.gate_proj.bias",
    "mlp.up_proj.weight", "mlp.up_proj.bias",
    "mlp.down_proj.weight", "mlp.down_proj.bias",
    "out_norm.weight", "out_norm.bias",
    "out_proj.weight", "out_proj.bias",
}


# ---------------------------------------------------------------------------------------------
# Forward and backward vs the oracle.


@pytest.mark.parametrize("form", ["packed", "batched"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_forward_matches_oracle(backend, dtype, tol, form):
    proj = make_projector(backend, dtype).eval()
    if form == "packed":
        features, splits = packed_features(dtype), SPLITS
    else:
        features, splits = torch.randn(2, 4, P, SMALL["cross_hidden_size"], dtype=dtype), None
    with torch.no_grad():
        y = proj(features, splits)
    B = len(SPLITS) if form == "packed" else 2
    assert y.shape == (B, SMALL["num_query"], SMALL["output_size"])
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    err = rel_err(y, oracle_of(proj, features, splits))
    assert err <= tol, f"rel err {err:.3e}"


def test_batched_features_equal_packed_with_equal_splits():
    proj = make_projector().eval()
    x = torch.randn(3, 4, P, SMALL["cross_hidden_size"])
    with torch.no_grad():
        a = proj(x)
        b = proj(x.reshape(12, P, -1), [4, 4, 4])
        c = proj(x.reshape(12, P, -1), torch.tensor([4, 4, 4]))
    assert torch.equal(a, b) and torch.equal(b, c)


def test_one_frame_image():
    proj = make_projector().eval()
    x = torch.randn(2, P, SMALL["cross_hidden_size"])
    with torch.no_grad():
        y = proj(x, [1, 1])
    assert rel_err(y, oracle_of(proj, x, [1, 1])) <= 1e-5


@pytest.mark.parametrize("attention_bias,mlp_bias", [(False, True), (True, False), (False, False)])
def test_without_biases(attention_bias, mlp_bias):
    proj = make_projector(attention_bias=attention_bias, mlp_bias=mlp_bias).eval()
    keys = set(proj.state_dict())
    assert ("attn.q_proj.bias" in keys) == attention_bias
    assert ("mlp.gate_proj.bias" in keys) == mlp_bias
    assert "out_proj.bias" in keys
    x = packed_features()
    with torch.no_grad():
        assert rel_err(proj(x, SPLITS), oracle_of(proj, x, SPLITS)) <= 1e-5


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradients_match_oracle(backend, mode):
    """Every parameter's and the features' gradient vs float64 autograd through the oracle."""
    proj = make_projector(backend)
    proj.train(mode == "train")
    x = packed_features(requires_grad=True)
    y = proj(x, SPLITS)
    dy = torch.randn_like(y)
    y.backward(dy)

    ref_params = {k: v.detach().double().requires_grad_(True) for k, v in proj.state_dict().items()}
    x64 = x.detach().double().requires_grad_(True)
    ref = projector_oracle(ref_params, proj.config, x64, SPLITS)
    ref.backward(dy.double())

    assert rel_err(y, ref) <= 1e-5
    assert rel_err(x.grad, x64.grad) <= 2e-5, "features"
    named = dict(proj.named_parameters())
    assert set(named) == set(ref_params)
    for name, p in named.items():
        assert p.grad is not None, f"no gradient for {name}"
        if name == "attn.k_proj.bias":
            # Adding one vector to every key adds a constant to each softmax row: the exact
            # gradient is 0, so measure the error against the k_proj.weight gradient instead.
            ref_norm = ref_params["attn.k_proj.weight"].grad.norm().item()
            err = (p.grad.double() - ref_params[name].grad).norm().item() / ref_norm
        else:
            err = rel_err(p.grad, ref_params[name].grad)
        assert err <= 2e-5, f"{name}: rel err {err:.3e}"


# ---------------------------------------------------------------------------------------------
# The query side in eval mode: no cache (issue 13.1), recomputed on every call; the bitwise
# fresh-module checks are in test_projector_state.py.


def fresh_query_states(proj):
    cfg = proj.config
    with torch.no_grad():
        q = proj.attn.q_proj(proj.query_norm(proj.query))
    return q.view(cfg.num_query, cfg.num_heads, cfg.head_dim)


def test_query_cache_not_used_when_parameters_need_grad():
    """Eval mode with autograd on: the query side is recomputed so gradients reach it."""
    proj = make_projector().eval()
    with torch.no_grad():
        proj.query_states()
    y = proj(packed_features(), SPLITS)
    y.sum().backward()
    for name in ("query", "query_norm.weight", "query_norm.bias", "attn.q_proj.weight", "attn.q_proj.bias"):
        g = dict(proj.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


@pytest.mark.parametrize(
    "change",
    ["query", "query_norm.weight", "query_norm.bias", "attn.q_proj.weight", "attn.q_proj.bias"],
)
def test_query_cache_sees_in_place_changes(change):
    proj = make_projector().eval()
    x = packed_features()
    with torch.no_grad():
        old = proj.query_states().clone()
        dict(proj.named_parameters())[change].add_(1)
        new = proj.query_states()
        assert not torch.equal(new, old)
        assert torch.equal(new, fresh_query_states(proj))
        y = proj(x, SPLITS)
    assert rel_err(y, oracle_of(proj, x, SPLITS)) <= 1e-5


def test_query_cache_after_load_state_dict():
    proj = make_projector().eval()
    other = make_projector().eval()
    x = packed_features()
    with torch.no_grad():
        proj.query_states()
        proj.load_state_dict(other.state_dict())
        assert torch.equal(proj.query_states(), fresh_query_states(other))
        assert torch.equal(proj(x, SPLITS), other(x, SPLITS))


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_query_cache_after_optimizer_step(foreach):
    proj = make_projector().eval()
    x = packed_features()
    with torch.no_grad():
        before = proj.query_states().clone()
    opt = torch.optim.SGD(proj.parameters(), lr=0.1, foreach=foreach)
    proj.train()
    proj(x, SPLITS).square().mean().backward()
    opt.step()
    proj.eval()
    with torch.no_grad():
        after = proj.query_states()
        assert not torch.equal(after, before)
        assert torch.equal(after, fresh_query_states(proj))
        assert rel_err(proj(x, SPLITS), oracle_of(proj, x, SPLITS)) <= 1e-5


def test_query_cache_after_dtype_change():
    proj = make_projector().eval()
    with torch.no_grad():
        assert proj.query_states().dtype == torch.float32
    proj.double()
    x = packed_features(torch.float64)
    with torch.no_grad():
        q = proj.query_states()
        assert q.dtype == torch.float64
        assert torch.equal(q, fresh_query_states(proj))
        y = proj(x, SPLITS)
    assert y.dtype == torch.float64
    assert rel_err(y, oracle_of(proj, x, SPLITS)) <= 1e-10


def test_query_cache_under_inference_mode():
    proj = make_projector().eval()
    x = packed_features()
    with torch.inference_mode():
        a = proj(x, SPLITS)
        b = proj(x, SPLITS)
    assert torch.equal(a, b)
    with torch.no_grad():
        c = proj(x, SPLITS)
    assert torch.equal(a, c)
    y = proj(x, SPLITS)  # autograd on: must not touch an inference tensor
    y.sum().backward()
    assert proj.query.grad is not None


def test_projector_built_under_inference_mode():
    """Parameters created under inference_mode are inference tensors without version counters."""
    with torch.inference_mode():
        proj = make_projector().eval()
        x = packed_features()
        a = proj(x, SPLITS)
        assert torch.equal(a, proj(x, SPLITS))
    assert rel_err(a, oracle_of(proj, x, SPLITS)) <= 1e-5


def test_query_cache_after_dtype_round_trip():
    """.half().float() rounds the parameters; a reused address must not revive the old cache."""
    proj = make_projector().eval()
    with torch.no_grad():
        proj.query_states()
        proj.half().float()
        assert torch.equal(proj.query_states(), fresh_query_states(proj))


def test_no_query_cache_in_training():
    proj = make_projector()
    proj.train()
    with torch.no_grad():
        a = proj.query_states()
        b = proj.query_states()
    assert a is not b
    assert torch.equal(a, b)
    y = proj(packed_features(), SPLITS)
    y.sum().backward()
    for name in ("query", "query_norm.weight", "query_norm.bias", "attn.q_proj.weight", "attn.q_proj.bias"):
        g = dict(proj.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# Dropout only in training.


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_dropout_only_in_training(backend):
    proj = make_projector(backend, attention_dropout=0.1, dropout=0.1)
    x = packed_features()
    proj.eval()
    with torch.no_grad():
        a, b = proj(x, SPLITS), proj(x, SPLITS)
    assert torch.equal(a, b)
    assert rel_err(a, oracle_of(proj, x, SPLITS)) <= 1e-5, "eval mode must not drop anything"
    proj.train()
    with torch.no_grad():
        c, d = proj(x, SPLITS), proj(x, SPLITS)
    assert not torch.equal(c, d)
    assert not torch.allclose(c, a)


@pytest.mark.parametrize("which", ["attention_dropout", "dropout"])
def test_each_dropout_is_applied_in_training(which):
    proj = make_projector(**{which: 0.5})
    proj.train()
    x = packed_features()
    with torch.no_grad():
        c, d = proj(x, SPLITS), proj(x, SPLITS)
    assert not torch.equal(c, d), f"{which}=0.5 had no effect in training"


def test_training_without_dropout_equals_eval():
    proj = make_projector()
    x = packed_features()
    with torch.no_grad():
        proj.train()
        a = proj(x, SPLITS)
        proj.eval()
        b = proj(x, SPLITS)
    assert rel_err(a, b) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Names.


def test_state_dict_keys_are_the_spec_names():
    proj = CCAMProjector(make_config())
    assert set(proj.state_dict()) == EXPECTED_KEYS
    sd = proj.state_dict()
    C, Cv, N = SMALL["hidden_size"], SMALL["cross_hidden_size"], SMALL["num_query"]
    kv = SMALL["num_key_value_heads"] * C // SMALL["num_heads"]
    assert sd["query"].shape == (N, C)
    assert sd["attn.q_proj.weight"].shape == (C, C)
    assert sd["attn.k_proj.weight"].shape == (kv, Cv)
    assert sd["attn.v_proj.weight"].shape == (kv, Cv)
    assert sd["attn.o_proj.weight"].shape == (C, C)
    assert sd["mlp.gate_proj.weight"].shape == (SMALL["intermediate_size"], C)
    assert sd["mlp.down_proj.weight"].shape == (C, SMALL["intermediate_size"])
    assert sd["out_proj.weight"].shape == (SMALL["output_size"], C)
    assert sd["feature_norm.weight"].shape == (Cv,)


def test_default_projector_is_v1_2_sized():
    cfg = CCAMConfig()
    proj = CCAMProjector(cfg)
    assert proj.query.shape == (1024, 1024)
    assert proj.attn.k_proj.weight.shape == (1024, 1152)
    assert proj.out_proj.weight.shape == (3584, 1024)
    assert isinstance(CCAMProjector(), CCAMProjector)


# ---------------------------------------------------------------------------------------------
# Config.


def test_config_from_dict_flat_and_nested():
    flat = {**SMALL, "hidden_act": "swiglu", "attention_dropout": 0.05, "dropout": 0.0,
            "_name_or_path": "ignored", "architectures": ["X"]}
    a = CCAMConfig.from_dict(flat)
    b = CCAMConfig.from_dict({"model_type": "videoccam", "hidden_size": 4096, "projector_config": flat})
    assert a == b
    assert a.hidden_size == SMALL["hidden_size"] and a.attention_dropout == 0.05
    assert CCAMConfig.from_dict(a.to_dict()) == a
    assert isinstance(CCAMProjector(flat).config, CCAMConfig)
    assert CCAMProjector(flat).config == a


def test_config_json_round_trip(tmp_path):
    cfg = make_config(hidden_act="silu", layer_norm_eps=1e-6)
    cfg.to_json_file(tmp_path / "config.json")
    assert CCAMConfig.from_json_file(tmp_path / "config.json") == cfg
    assert CCAMConfig.from_json_file(tmp_path) == cfg


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _eval_outputs(proj, x):
    proj.eval()
    with torch.no_grad():
        return proj(x, SPLITS)


def test_save_and_load_round_trip(tmp_path):
    proj = make_projector()
    x = packed_features()
    proj.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").exists()
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    loaded = CCAMProjector.from_pretrained(tmp_path / "ckpt", backend="reference")
    assert loaded.config == proj.config
    assert loaded.backend == "reference"
    for key, value in proj.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Another backend: the same function up to rounding.
    assert rel_err(_eval_outputs(loaded, x), _eval_outputs(proj, x)) <= 1e-5
    same_backend = CCAMProjector.from_pretrained(str(tmp_path / "ckpt"), backend="torch")
    assert torch.equal(_eval_outputs(same_backend, x), _eval_outputs(proj, x))


def test_from_pretrained_returns_eval_mode(tmp_path):
    proj = make_projector(attention_dropout=0.5, dropout=0.5).eval()
    x = packed_features()
    proj.save_pretrained(tmp_path / "ckpt")
    loaded = CCAMProjector.from_pretrained(tmp_path / "ckpt")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x, SPLITS), proj(x, SPLITS))


def test_load_float64_checkpoint_keeps_dtype(tmp_path):
    proj = make_projector(dtype=torch.float64)
    proj.save_pretrained(tmp_path)
    loaded = CCAMProjector.from_pretrained(tmp_path)
    assert loaded.query.dtype == torch.float64
    as32 = CCAMProjector.from_pretrained(tmp_path, dtype=torch.float32)
    assert as32.query.dtype == torch.float32


def _write_torch_checkpoint(path, state, config: dict):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(config))


def test_load_torch_state_dict_file_with_nested_config(tmp_path):
    proj = make_projector()
    x = packed_features()
    config = {"model_type": "videoccam", "projector_config": {**proj.config.to_dict(), "unknown_field": 1}}
    _write_torch_checkpoint(tmp_path, proj.state_dict(), config)
    loaded = CCAMProjector.from_pretrained(tmp_path, backend="torch")
    assert loaded.config == proj.config
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(proj, x))


def test_load_weights_file_with_explicit_config(tmp_path):
    proj = make_projector()
    torch.save(proj.state_dict(), tmp_path / "weights.pt")
    loaded = CCAMProjector.from_pretrained(tmp_path / "weights.pt", config=proj.config.to_dict(), backend="torch")
    x = packed_features()
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(proj, x))


def _prefixed_checkpoint(tmp_path, proj):
    """Keys as in a full model: 'projector.<ours>' plus LLM weights that are not ours."""
    state = {f"projector.{k}": v for k, v in proj.state_dict().items()}
    state["llm.lm_head.weight"] = torch.randn(3, 3)
    state["llm.embed_tokens.weight"] = torch.randn(3, 3)
    _write_torch_checkpoint(tmp_path, state, proj.config.to_dict())
    return state


def test_key_map_dict(tmp_path):
    proj = make_projector()
    state = _prefixed_checkpoint(tmp_path, proj)
    key_map = {k: (k[len("projector."):] if k.startswith("projector.") else None) for k in state}
    loaded = CCAMProjector.from_pretrained(tmp_path, key_map=key_map, backend="torch")
    x = packed_features()
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(proj, x))


def test_key_map_dict_keeps_unlisted_names(tmp_path):
    proj = make_projector()
    state = dict(proj.state_dict())
    state["old_query_name"] = state.pop("query")
    _write_torch_checkpoint(tmp_path, state, proj.config.to_dict())
    loaded = CCAMProjector.from_pretrained(tmp_path, key_map={"old_query_name": "query"})
    assert torch.equal(loaded.query, proj.query)


def test_key_map_callable(tmp_path):
    proj = make_projector()
    _prefixed_checkpoint(tmp_path, proj)

    def key_map(key):
        return key.removeprefix("projector.") if key.startswith("projector.") else None

    loaded = CCAMProjector.from_pretrained(tmp_path, key_map=key_map, backend="torch")
    x = packed_features()
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(proj, x))


def test_unmapped_prefixed_keys_are_named(tmp_path):
    proj = make_projector()
    _prefixed_checkpoint(tmp_path, proj)
    # The first 20 unexpected keys are listed; the rest are counted and their prefix named.
    with pytest.raises(ValueError, match=r"and \d+ more; .* under the prefix 'projector\.'") as info:
        CCAMProjector.from_pretrained(tmp_path)
    assert "llm.lm_head.weight" in str(info.value)
    assert "'query'" in str(info.value)


def test_missing_key_is_named(tmp_path):
    proj = make_projector()
    state = dict(proj.state_dict())
    del state["out_proj.bias"]
    _write_torch_checkpoint(tmp_path, state, proj.config.to_dict())
    with pytest.raises(ValueError, match=r"missing.*out_proj\.bias"):
        CCAMProjector.from_pretrained(tmp_path)


def test_key_mapped_to_none_leaves_a_missing_parameter(tmp_path):
    proj = make_projector()
    proj.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"mlp\.up_proj\.weight"):
        CCAMProjector.from_pretrained(tmp_path, key_map={"mlp.up_proj.weight": None})


def test_unexpected_key_is_named(tmp_path):
    proj = make_projector()
    state = dict(proj.state_dict())
    state["attn.rotary.inv_freq"] = torch.ones(4)
    _write_torch_checkpoint(tmp_path, state, proj.config.to_dict())
    with pytest.raises(ValueError, match=r"unexpected.*attn\.rotary\.inv_freq"):
        CCAMProjector.from_pretrained(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    proj = make_projector()
    state = dict(proj.state_dict())
    state["attn.k_proj.weight"] = torch.randn(5, SMALL["cross_hidden_size"])
    _write_torch_checkpoint(tmp_path, state, proj.config.to_dict())
    with pytest.raises(ValueError, match=r"shape.*attn\.k_proj\.weight"):
        CCAMProjector.from_pretrained(tmp_path)


def test_key_map_collision_is_an_error(tmp_path):
    proj = make_projector()
    proj.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"out_norm\.bias"):
        CCAMProjector.from_pretrained(tmp_path, key_map={"out_norm.weight": "out_norm.bias"})


def test_bad_key_map_type(tmp_path):
    proj = make_projector()
    proj.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="key_map"):
        CCAMProjector.from_pretrained(tmp_path, key_map=["query"])


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        CCAMProjector.from_pretrained(tmp_path)
    make_config().to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="weights"):
        CCAMProjector.from_pretrained(tmp_path)


def test_public_names():
    for name in ("ccam_attention", "frame_of_query", "available_backends", "CCAMConfig", "CCAMProjector"):
        assert hasattr(ccam_kernels, name)
        assert name in ccam_kernels.__all__
