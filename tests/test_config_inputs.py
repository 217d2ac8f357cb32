"""CCAMConfig inputs (issue 13 item 7): unknown keys warn by name, fields a config file leaves
out are named, NumPy scalars become Python values, layer_norm_eps must be finite and > 0."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest

from ccam_kernels import CCAMConfig, CCAMProjector
from ccam_kernels.config import HF_METADATA_KEYS

SMALL = dict(num_query=9, hidden_size=16, cross_hidden_size=12, num_heads=4, num_key_value_heads=2,
             intermediate_size=8, output_size=10, hidden_act="silu", attention_bias=False, mlp_bias=True,
             layer_norm_eps=1e-6, attention_dropout=0.0, dropout=0.05)
FIELDS = [f.name for f in dataclasses.fields(CCAMConfig)]


def test_small_covers_every_field():
    assert sorted(SMALL) == sorted(FIELDS)  # so "no warning" below means no field took a default


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "under-projector_config"])
def test_unknown_key_warns_naming_it(nested):
    d = {k: v for k, v in SMALL.items() if k != "num_query"}
    d["num_querys"] = 9  # the typo that used to give num_query=1024 without a word
    d["rope_theta"] = 1e4
    if nested:
        d = {"model_type": "videoccam", "vision_config": {"x": 1}, "projector_config": d}
    with pytest.warns(UserWarning) as record:
        cfg = CCAMConfig.from_dict(d)
    messages = " ".join(str(w.message) for w in record)
    assert "'num_querys' (did you mean 'num_query'?)" in messages
    assert "'rope_theta'" in messages
    # the outer keys of a whole-model config are not the projector's and are not reported
    assert "vision_config" not in messages and "model_type" not in messages
    assert cfg.num_query == 1024  # still ignored, as documented: the warning is what changed


def test_hugging_face_metadata_keys_do_not_warn():
    d = {**SMALL, **{key: "x" for key in HF_METADATA_KEYS}}
    assert {"model_type", "architectures", "torch_dtype", "transformers_version", "auto_map",
            "_name_or_path"} <= set(HF_METADATA_KEYS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = CCAMConfig.from_dict(d)
        CCAMProjector(d)  # the constructor takes dicts through from_dict too
    assert cfg == CCAMConfig(**SMALL)


def test_config_file_names_the_fields_that_took_defaults(tmp_path):
    partial = {k: v for k, v in SMALL.items() if k not in ("dropout", "output_size")}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(partial))
    with pytest.warns(UserWarning, match=r"does not set \['output_size', 'dropout'\]") as record:
        cfg = CCAMConfig.from_json_file(path)
    assert str(path) in str(record[0].message)
    assert cfg.output_size == 3584 and cfg.dropout == 0.1
    # a complete file (what save_pretrained writes) loads without any warning
    CCAMConfig(**SMALL).to_json_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CCAMConfig.from_json_file(tmp_path) == CCAMConfig(**SMALL)


def test_loading_a_checkpoint_names_defaulted_fields_and_unknown_keys(tmp_path):
    CCAMProjector(CCAMConfig(**SMALL)).save_pretrained(tmp_path)  # attention_bias=False
    d = json.loads((tmp_path / "config.json").read_text())
    d["attn_bias"] = d.pop("attention_bias")  # a misspelt key: attention_bias takes the default True
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "videoccam", "projector_config": d}))
    with pytest.warns(UserWarning) as record:
        # the default True asks for attention biases the checkpoint does not have
        with pytest.raises(ValueError, match=r"missing keys.*attn\.q_proj\.bias"):
            CCAMProjector.from_pretrained(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "does not set ['attention_bias']" in messages
    assert "'attn_bias' (did you mean 'attention_bias'?)" in messages


NUMPY_VALUES = [
    ("num_query", np.int64(9), int), ("hidden_size", np.int32(16), int), ("num_heads", np.uint8(4), int),
    ("attention_bias", np.bool_(False), bool), ("mlp_bias", np.bool_(True), bool),
    ("layer_norm_eps", np.float32(1e-6), float), ("dropout", np.float64(0.05), float),
    ("attention_dropout", np.float16(0.0), float), ("hidden_act", np.str_("silu"), str),
]


@pytest.mark.parametrize("name,value,kind", NUMPY_VALUES, ids=[f"{n}-{type(v).__name__}" for n, v, _ in NUMPY_VALUES])
def test_numpy_scalars_become_python_values(tmp_path, name, value, kind):
    cfg = CCAMConfig.from_dict({**SMALL, name: value})
    assert type(getattr(cfg, name)) is kind
    assert getattr(cfg, name) == kind(value)
    # the bug: np.int64 was stored and save_pretrained wrote a 17-byte config.json
    CCAMProjector(cfg).save_pretrained(tmp_path)
    loaded = CCAMConfig.from_json_file(tmp_path)
    assert loaded == cfg
    assert json.loads((tmp_path / "config.json").read_text())[name] == kind(value)


def test_every_numpy_field_at_once_round_trips(tmp_path):
    d = {k: (np.int64(v) if type(v) is int else np.float64(v) if type(v) is float
             else np.bool_(v) if type(v) is bool else v) for k, v in SMALL.items()}
    cfg = CCAMConfig(**d)
    assert all(type(getattr(cfg, k)) is type(v) for k, v in SMALL.items())
    cfg.to_json_file(tmp_path / "config.json")
    assert CCAMConfig.from_json_file(tmp_path / "config.json") == CCAMConfig(**SMALL)


@pytest.mark.parametrize("eps", [math.inf, -math.inf, math.nan, 0.0, -1e-5, np.float64(np.inf)],
                         ids=["inf", "-inf", "nan", "0", "negative", "np.inf"])
def test_layer_norm_eps_must_be_finite_and_positive(eps):
    with pytest.raises(ValueError, match=r"layer_norm_eps must be finite and > 0"):
        CCAMConfig(**{**SMALL, "layer_norm_eps": eps})


@pytest.mark.parametrize("name,value", [("layer_norm_eps", np.bool_(True)), ("dropout", True),
                                        ("num_query", np.float64(9.0)), ("mlp_bias", 1),
                                        ("hidden_act", 3)])
def test_wrong_types_are_still_refused(name, value):
    with pytest.raises(TypeError, match=name):
        CCAMConfig(**{**SMALL, name: value})


@pytest.mark.parametrize("text", ["{\"num_query\": 9,", "", "\xff\xfe garbage"], ids=["truncated", "empty", "binary"])
def test_unparsable_config_file_names_the_file(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="config.json.*not a valid JSON"):
        CCAMConfig.from_json_file(path)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "under-projector_config"])
def test_num_key_value_heads_defaults_to_num_heads(nested):
    """Issue 21, item 10: {num_heads: 4} without num_key_value_heads took v1.2's 16 and was
    refused (4 is not a multiple of 16); as in Hugging Face configs it now means Hkv = H."""
    d = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
    cfg = CCAMConfig.from_dict({"projector_config": d} if nested else d)
    assert cfg.num_heads == cfg.num_key_value_heads == 4
    assert cfg == CCAMConfig(**{**SMALL, "num_key_value_heads": 4})
    proj = CCAMProjector(d)  # the constructor's dict path: k_proj is (Hkv * D, Cv) = (16, 12)
    assert proj.attn.k_proj.weight.shape == (16, 12)
    # A given num_key_value_heads wins; neither given keeps the v1.2 pair (16, 16).
    assert CCAMConfig.from_dict({**d, "num_key_value_heads": 1}).num_key_value_heads == 1
    assert CCAMConfig.from_dict({}).num_key_value_heads == CCAMConfig().num_key_value_heads == 16
    only_kv = CCAMConfig.from_dict({"num_key_value_heads": 8})
    assert (only_kv.num_heads, only_kv.num_key_value_heads) == (16, 8)


def test_config_file_without_num_key_value_heads_takes_num_heads_silently(tmp_path):
    d = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a default taken: no "does not set" warning
        cfg = CCAMConfig.from_json_file(path)
    assert cfg.num_key_value_heads == 4
