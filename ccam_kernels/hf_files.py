"""What ``save_pretrained`` adds to a checkpoint folder so that transformers' AutoModel loads it
(``AutoModel.from_pretrained(folder, trust_remote_code=True)``): the ``auto_map`` entries of
config.json and modeling_ccam.py, a small file that imports the classes from
:mod:`ccam_kernels.hf`. No transformers import here: saving never needs it."""

from __future__ import annotations

MODEL_TYPE = "ccam_projector"
MODELING_FILE = "modeling_ccam.py"
AUTO_MAP_CONFIG = {
    "model_type": MODEL_TYPE,
    "architectures": ["CCAMProjectorModel"],
    "auto_map": {
        "AutoConfig": "modeling_ccam.CCAMProjectorConfig",
        "AutoModel": "modeling_ccam.CCAMProjectorModel",
    },
}


def modeling_source() -> str:
    """modeling_ccam.py: transformers copies it into its module cache and imports it; the code
    stays in the installed ccam_kernels (no copy to drift from the library)."""
    return (
        '"""Loads this folder\'s Video-CCAM projector through transformers\' AutoModel\n'
        "(trust_remote_code=True). Written by ccam_kernels' CCAMProjector.save_pretrained; the code\n"
        "is ccam_kernels.hf: pip install 'ccam_kernels[hf]'.\"\"\"\n\n"
        "from ccam_kernels.hf import CCAMProjectorConfig, CCAMProjectorModel\n\n"
        '__all__ = ["CCAMProjectorConfig", "CCAMProjectorModel"]\n'
    )
