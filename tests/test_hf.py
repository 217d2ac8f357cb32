"""The transformers integration (docs/reference.md §4.4), with transformers installed (the [hf]
extra, part of [test]): AutoModel.from_pretrained(trust_remote_code=True) on a folder our
save_pretrained wrote, and a tiny random SigLIP -> CCAMProjector -> Qwen2 pipeline that
generates and takes a training step whose gradients reach the vision encoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the [hf] extra (pip install 'ccam_kernels[hf]')")

from ccam_kernels import CCAMConfig, CCAMProjector  # noqa: E402
from ccam_kernels.hf import CCAMProjectorConfig, CCAMProjectorModel  # noqa: E402

VISION = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=8, num_channels=3, vision_use_head=False)
LLM = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
           num_key_value_heads=1, max_position_embeddings=128)
PROJ = CCAMConfig(num_query=6, hidden_size=16, cross_hidden_size=VISION["hidden_size"], num_heads=2,
                  num_key_value_heads=1, intermediate_size=24, output_size=LLM["hidden_size"],
                  attention_dropout=0.0, dropout=0.0)


def _random_projector(seed=0) -> CCAMProjector:
    torch.manual_seed(seed)
    proj = CCAMProjector(PROJ, backend="torch")
    with torch.no_grad():
        for p in proj.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return proj


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    # transformers copies modeling_ccam.py into its module cache: keep it in the test's folder.
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    return tmp_path


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_automodel_loads_what_save_pretrained_wrote(hf_home, dtype):
    proj = _random_projector().eval()
    proj.save_pretrained(hf_home / "ckpt")
    model = transformers.AutoModel.from_pretrained(hf_home / "ckpt", trust_remote_code=True, dtype=dtype,
                                                   device_map="cpu")
    assert isinstance(model, CCAMProjectorModel) and not model.training
    expected = torch.float32 if dtype == "auto" else torch.bfloat16
    assert model.dtype == expected and model.projector.dtype == expected
    assert model.config.to_ccam_config() == PROJ
    for name, value in proj.state_dict().items():
        torch.testing.assert_close(model.projector.state_dict()[name], value.to(expected), rtol=0, atol=0)
    x = torch.randn(5, 4, PROJ.cross_hidden_size)
    y = model(x.to(expected), [2, 3])
    torch.testing.assert_close(y.float(), proj(x, [2, 3]), rtol=0 if dtype == "auto" else 0.05,
                               atol=0 if dtype == "auto" else 0.05)
    # and back: the wrapper saves the projector's own checkpoint, which both load
    model.save_pretrained(hf_home / "wrapped")
    again = CCAMProjector.from_pretrained(hf_home / "wrapped")
    torch.testing.assert_close(again(x.to(expected), [2, 3]), y)
    reloaded = transformers.AutoModel.from_pretrained(hf_home / "wrapped", trust_remote_code=True)
    torch.testing.assert_close(reloaded(x.to(expected), [2, 3]), y)
    with pytest.raises(TypeError, match="CCAMProjectorModel.save_pretrained takes save_directory and"):
        model.save_pretrained(hf_home / "other", push_to_hub=True)


def test_config_is_checked_by_ccam_config():
    with pytest.raises(ValueError, match="hidden_size must be a multiple of num_heads"):
        CCAMProjectorConfig(hidden_size=10, num_heads=3)
    cfg = CCAMProjectorConfig.from_ccam_config(PROJ)
    assert cfg.to_ccam_config() == PROJ and cfg.model_type == "ccam_projector"


class VideoLM(nn.Module):
    """Vision encoder -> projector -> LLM, as Video-CCAM composes them: each video's frames go
    through the encoder, the projector turns them into N tokens that precede the text."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))
        self.projector = projector
        self.llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLM))

    def embeds(self, pixel_values, split_sizes, input_ids):
        features = self.vision(pixel_values=pixel_values).last_hidden_state  # (F, P, Cv)
        visual = self.projector(features, split_sizes)  # (B, N, C_llm)
        text = self.llm.get_input_embeddings()(input_ids)
        return torch.cat([visual.to(text.dtype), text], dim=1)


@pytest.mark.parametrize("wrapped", [False, True], ids=["CCAMProjector", "CCAMProjectorModel"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_siglip_projector_qwen2_generate_and_train(wrapped, autocast):
    torch.manual_seed(0)
    projector = _random_projector()
    if wrapped:
        projector = CCAMProjectorModel(CCAMProjectorConfig.from_ccam_config(PROJ))
    model = VideoLM(projector)
    splits = [2, 3]
    pixels = torch.randn(sum(splits), 3, VISION["image_size"], VISION["image_size"])
    ids = torch.randint(0, LLM["vocab_size"], (len(splits), 5))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)

    model.eval()
    with torch.no_grad(), ctx:
        embeds = model.embeds(pixels, splits, ids)
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (len(splits), 3) and out.dtype == torch.long

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ctx:
        embeds = model.embeds(pixels, splits, ids)
        labels = torch.cat([torch.full((len(splits), PROJ.num_query), -100), ids], dim=1)
        loss = model.llm(inputs_embeds=embeds, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    for part in (model.vision, model.projector, model.llm):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    before = model.vision.embeddings.patch_embedding.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.vision.embeddings.patch_embedding.weight)
