"""The public API documents itself, and docs/reference.md documents the public API.

- every public name (ccam_kernels.__all__ and the long-video API) and every public method of
  the public classes has a docstring, annotated parameters and return, and the annotations
  resolve to real types;
- the signatures in the package docstring are those of the functions (ccam_attention's first);
- docs/reference.md names every public function and method;
- every error and warning message the code gives for user input contains one of the stems
  below, and each stem is literal text of the code and of docs/reference.md. A new message
  therefore fails this test until it is added here and documented there.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re
import typing

import pytest
from torch import nn

import ccam_kernels
from ccam_kernels import long_video

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ccam_kernels"
REFERENCE = ROOT / "docs" / "reference.md"

PUBLIC = {name: getattr(ccam_kernels, name) for name in ccam_kernels.__all__ if name != "__version__"}
PUBLIC.update({name: getattr(long_video, name) for name in long_video.__all__})

# Names the annotations may use that their modules import only for type checking.
TYPE_NAMESPACE = {**PUBLIC, "ProjectorStream": long_video.ProjectorStream}


def _public_callables():
    """(qualified name, callable) of every public function, class constructor and method."""
    out = []
    for name, obj in PUBLIC.items():
        if not inspect.isclass(obj):
            out.append((name, obj))
            continue
        out.append((f"{name}.__init__", obj.__init__))
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            # nn.Module's own hooks (extra_repr) are documented by torch; forward is ours.
            if issubclass(obj, nn.Module) and attr in vars(nn.Module) and attr != "forward":
                continue
            if isinstance(member, property):
                out.append((f"{name}.{attr}", member.fget))
            elif isinstance(member, (classmethod, staticmethod)) or inspect.isfunction(member):
                out.append((f"{name}.{attr}", getattr(obj, attr)))
    return out


CALLABLES = _public_callables()


def test_the_public_api_is_what_the_reference_lists():
    assert set(PUBLIC) == {"ccam_attention", "frame_of_query", "available_backends", "CCAMConfig", "CCAMProjector",
                           "ccam_partial_attention", "merge_partials", "ProjectorStream"}
    names = {qualname for qualname, _ in CALLABLES}
    for method in ("CCAMProjector.forward", "CCAMProjector.stream", "CCAMProjector.from_pretrained",
                   "CCAMProjector.save_pretrained", "CCAMConfig.from_dict", "ProjectorStream.push",
                   "ProjectorStream.finish"):
        assert method in names


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_name_has_a_docstring(name):
    doc = inspect.getdoc(PUBLIC[name])
    assert doc and len(doc.split()) >= 5, f"{name} has no docstring worth the name"


@pytest.mark.parametrize("qualname,fn", CALLABLES, ids=[q for q, _ in CALLABLES])
def test_public_callable_is_documented_and_annotated(qualname, fn):
    if not qualname.endswith(".__init__"):  # a constructor is documented by its class
        assert inspect.getdoc(fn), f"{qualname} has no docstring"
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{qualname}: parameters without a type hint: {missing}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{qualname} has no return annotation"
    hints = typing.get_type_hints(fn, localns=TYPE_NAMESPACE)  # every annotation names a real type
    assert set(hints) >= {p.name for p in params} | {"return"}


def test_forward_docstring_covers_shapes_dtypes_frames_group_and_errors():
    doc = inspect.getdoc(ccam_kernels.CCAMProjector.forward)
    for needle in ("(F, P, Cv)", "(B, T, P, Cv)", "(B, N, output_size)", "dtype", "split_sizes", "group",
                   "autocast", "Raises", "TypeError", "ValueError", "RuntimeError"):
        assert needle in doc, f"CCAMProjector.forward's docstring lacks {needle!r}"


# ---------------------------------------------------------------------------------------------
# The package docstring.


def _docstring_signatures() -> dict:
    """{name: ast.FunctionDef} for every ``name(...)`` line of the package docstring that names
    a public function."""
    found = {}
    for line in ccam_kernels.__doc__.splitlines():
        match = re.match(r"\s*(\w+)(\(.*\)(?:\s*->\s*.+)?)\s*$", line)
        if match and match.group(1) in PUBLIC and inspect.isfunction(PUBLIC[match.group(1)]):
            found[match.group(1)] = ast.parse(f"def {match.group(1)}{match.group(2)}: pass").body[0]
    return found


def _shape(signature: inspect.Signature) -> list:
    """(name, kind, default) of each parameter: what a caller sees, annotations aside."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_package_docstring_shows_the_real_signatures():
    documented = _docstring_signatures()
    assert "ccam_attention" in documented, "the package docstring must show ccam_attention's signature"
    for name, node in documented.items():
        source = f"def {name}{ast.unparse(node.args).join('()')}: pass"
        namespace = {}
        exec(source, namespace)  # noqa: S102 - our own docstring, parsed above
        shown = inspect.signature(namespace[name])
        real = inspect.signature(PUBLIC[name])
        assert _shape(shown) == _shape(real), f"{name}: docstring {shown} vs code {real}"
        assert node.returns is not None, f"{name}: the docstring shows no return type"
        real_return = real.return_annotation
        real_return = real_return if isinstance(real_return, str) else inspect.formatannotation(real_return)
        assert ast.unparse(node.returns) == ast.unparse(ast.parse(real_return, mode="eval")), name


# ---------------------------------------------------------------------------------------------
# docs/reference.md.


def _reference_text() -> str:
    return " ".join(REFERENCE.read_text(encoding="utf-8").split())  # wrapped lines read as one


def test_reference_names_every_public_function_and_method():
    text = _reference_text()
    for qualname, _ in CALLABLES:
        name = qualname.rsplit(".", 1)[-1]
        if name == "__init__":
            name = qualname.split(".")[0]
        assert re.search(rf"`[^`]*\b{re.escape(name)}\b[^`]*`", text), f"docs/reference.md never names `{name}`"
    assert "group=" in text


# Stems of the messages of every error and warning the library gives for user input (raised,
# warned, or the reason inside a RuntimeError). Each is literal text of the code, never
# spanning a value filled in, and is quoted in docs/reference.md §6 or §8.
STEMS = [
    # ccam_attention and the shared checks (§8.1, §8.2)
    "must be a torch.Tensor, got",
    "must be an int, got",
    "must be >= ",
    "must be a float, got",
    "must be in [0, 1), got",
    "must not be empty (one frame count per sample)",
    "must be >= 1 for every sample, got",
    "q must be (B, N, H, D) or (N, H, D), got shape",
    "k must be (L, Hkv, D), got shape",
    "v must be (L, Hkv, D), got shape",
    "k and v must have the same shape, got k",
    "q, k and v must share one dtype, got q",
    "q, k and v must be on one device, got q",
    "head dim mismatch: q has D=",
    "q and k must have non-empty dims, got q",
    "the number of query heads H=",
    "must be a multiple of the key/value heads Hkv=",
    "keys, but k and v have L=",
    "q has batch size",
    "must be an integer tensor (int64, int32, int16, int8 or uint8), got dtype",
    "must be an integer tensor (int64), got dtype",
    "must be 1-D (B,), got a tensor of shape",
    "must be 1-D (B,), got shape",
    "must hold values, got a meta tensor (meta tensors have no data)",
    "must be an integer array, got a NumPy array of dtype",
    "must be 1-D (B,), got a NumPy array of shape",
    "must be a sequence of ints, a 1-D integer array or an integer tensor, got",
    "must be float32, float16, bfloat16 or float64, got",
    "scale must be a float or None, got",
    "scale must be finite and non-zero, got",
    "frame_counts must be >= 1 for every sample and not empty, got",
    "so that frame_of_query is exact in int64 arithmetic, got",
    "ccam_attention has no double backward",
    # backend= (§8.3) and why a backend is unusable (§6)
    "backend must be a str, got",
    "backend must be a str or a callable, got",
    "backend must be one of",
    "cannot run here:",
    "no backend can run these inputs:",
    ". Usable backends:",
    "triton is not installed",
    "no CUDA device",
    "Triton's CPU interpreter computes bfloat16 dots wrong",
    "the CUDA extension is not built",
    "its JIT build (CCAM_CUDA_JIT=1) failed",
    "its mma.sync kernels need an sm_80 or newer GPU",
    "the CUDA extension holds no kernels for this",
    "its kernels run on 16-bit tensor cores",
    "it runs on",
    "it supports dtypes",
    "it supports head dims that are multiples of 8 from 16 to 128",
    "it does not implement attention dropout",
    # CCAMConfig (§8.4)
    "hidden_size must be a multiple of num_heads, got hidden_size=",
    "num_heads must be a multiple of num_key_value_heads, got num_heads=",
    "hidden_act must be a str, one of",
    "hidden_act must be one of",
    "must be a bool, got",
    "layer_norm_eps must be finite and > 0, got",
    "config must be a dict, got",
    "config['projector_config'] must be a dict, got",
    "is not a valid JSON config file:",
    # CCAMProjector (§8.5)
    "config must be a CCAMConfig or a dict, got",
    "features must be a torch.Tensor, got",
    "features must be (F, P, Cv) or (B, T, P, Cv), got shape",
    "videos but padded features (B, T_max, P, Cv) has B=",
    "must be <= T_max=",
    "gradient_checkpointing_kwargs must be a dict or None, got",
    "split_sizes is required when features is (F, P, Cv)",
    "frames, but features has F=",
    "features width must equal cross_hidden_size=",
    "features must not be empty, got shape",
    "features dtype must match the module's (",
    "or the autocast dtype inside torch.autocast, got",
    "features device must match the module's (",
    # checkpoints (§8.6)
    "path must be a str or os.PathLike, got",
    "checkpoint path",
    "does not exist",
    ": pass config=",
    "no weights in",
    "*.safetensors or a torch state dict",
    "cannot read weights file",
    ": truncated, corrupt or not a",
    "does not hold a state dict (got",
    "; expected only tensors",
    "is in two weights files:",
    "key_map must be a dict, a callable or None, got",
    "key_map maps both",
    "key_map must map each key to a str or None, got",
    "cannot load checkpoint:",
    "unexpected keys (not parameters of",
    "missing keys (parameters the checkpoint does not fill):",
    "shape mismatch for",
    "dtype mismatch for",
    "dtype must be a torch.dtype or None, got",
    "dtype must be a floating-point torch.dtype, got",
    "device must be a torch.device or a device string, got",
    "device='meta' is refused: meta tensors hold no data",
    "cannot hold tensors on this machine:",
    "save_pretrained needs a directory, but",
    "safe_serialization and auto_map must be bools, got",
    "pass dtype= or torch_dtype= (the same argument), not both",
    "dtype must be a torch.dtype, 'auto' or one of",
    "pass device= or device_map=, not both",
    "device_map must put the whole projector on one device",
    "subfolder must be a str, got",
    "revision= applies to a Hub repo id, but",
    "does not exist locally, and downloading it as a Hugging Face Hub repo id needs huggingface_hub",
    "does not exist locally and could not be downloaded from the Hugging Face Hub",
    "is an existing file",
    "is not whole: ",
    # long videos (§8.7)
    "frame_ranges must be a sequence of (first, end) int pairs, got",
    "frame_ranges must hold one (first, end) pair per sample (",
    "] must be a (first, end) pair, got",
    "] must satisfy 0 <= first <= end <= frame_counts[",
    "k and v must both be (L, Hkv, D), got k",
    " must be a multiple of Hkv=",
    "cannot run partial attention here:",
    "cannot run partial attention for this projector:",
    "merge_partials needs at least one (out, lse) pair, got none",
    "merge_partials needs an iterable of (out, lse) pairs, got",
    "] must be an (out, lse) pair of tensors, got",
    "] must be out (B, N, H, D) and lse (B, H, N), got out",
    "merge_partials: every partial must have the shapes of the first, got out",
    "merge_partials: every partial must have the dtypes and device of the first, got",
    "long-video paths need partial attention, which a callable backend does not provide",
    "but this stream started in",
    "this stream is closed (finished, or its parameters changed)",
    "the projector's parameters changed since proj.stream() started",
    "the stream is unchanged and still usable",
    "chunk must be a torch.Tensor (t, P, Cv), got",
    "chunk must be (t, P, Cv), got shape",
    "chunk width must equal cross_hidden_size=",
    "chunk must hold t >= 1 frames of P >= 1 tokens, got shape",
    "tokens per frame of the earlier chunks, got",
    "chunk dtype must match the module's (",
    "chunk device must match the module's (",
    " frames but only ",
    "finish() after",
    "group= needs torch.distributed, which this PyTorch build does not provide",
    "group= needs an initialized process group",
    "split_sizes must be None when features is (B, t, P, Cv), got",
    "features must be (F, P, Cv) or (B, t, P, Cv), got shape",
    "split_sizes must be a non-empty sequence of ints >= 0 (frames of each video on this rank), got",
    "split_sizes must be >= 0 for every video, got",
    "features must have P >= 1 tokens per frame, got shape",
    "every rank must pass split_sizes for the same videos",
    "every rank must have the same tokens per frame P",
    "every video needs at least one frame over the group",
    "while checking the arguments:",
    # warnings (§8.8)
    "CCAMConfig ignores unknown config keys:",
    "does not set",
    "keeps no cache",
]

# Modules whose raises and warnings answer user input: every message must contain a stem.
USER_INPUT_MODULES = [
    "checks.py", "attention.py", "mask.py", "config.py", "projector.py", "checkpoint.py", "hub.py", "atomic_file.py",
    "backends/attention_ops.py", "long_video/partial.py", "long_video/stream.py",
    "long_video/distributed.py",
]
ERRORS = {"ValueError", "TypeError", "RuntimeError", "FileNotFoundError", "NotADirectoryError", "ImportError", "OSError"}


def _literal_parts(node: ast.AST) -> list[str]:
    """The literal text of a message expression: its string constants, f-string parts included
    (implicitly concatenated literals arrive as one constant)."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _package_literals() -> list[str]:
    parts = []
    for path in PACKAGE.rglob("*.py"):
        parts += _literal_parts(ast.parse(path.read_text(encoding="utf-8")))
    return parts


def _messages():
    """(where, literal parts) of every error raised and warning given in USER_INPUT_MODULES."""
    for rel in USER_INPUT_MODULES:
        path = PACKAGE / rel
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            call = node.exc if isinstance(node, ast.Raise) else node
            if not isinstance(call, ast.Call) or not call.args:
                continue
            func = call.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if isinstance(node, ast.Raise) and name not in ERRORS and name != "kind":
                continue
            if not isinstance(node, ast.Raise) and name != "warn":
                continue
            yield f"{rel}:{call.lineno}", _literal_parts(call.args[0])


def test_every_stem_is_literal_text_of_the_code():
    literals = _package_literals()
    missing = [stem for stem in STEMS if not any(stem in part for part in literals)]
    assert not missing, f"stems no longer in the code (update STEMS and docs/reference.md): {missing}"


def test_every_stem_is_in_the_reference():
    text = _reference_text()
    missing = [stem for stem in STEMS if stem not in text]
    assert not missing, f"docs/reference.md does not quote: {missing}"


def test_every_user_facing_message_has_a_documented_stem():
    messages = list(_messages())
    assert len(messages) > 100  # the scan finds the raises at all
    undocumented = []
    for where, parts in messages:
        if all(len(part.strip()) < 6 for part in parts):
            continue  # no text of its own: it relays other messages (the "rank r: ..." of group=)
        if not any(stem in part for part in parts for stem in STEMS):
            undocumented.append((where, parts))
    assert not undocumented, (
        "messages without a stem in STEMS (add one, and quote the message in docs/reference.md §8): "
        f"{undocumented}")
