"""Model factory: load an HF causal LM (instance or local checkpoint directory), check it is something we can
compile, and export it with torch.export (dynamic batch and sequence) into an ATen-level GraphModule."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx
from torch.export import Dim

from autodeploy.errors import UnsupportedModelError
from autodeploy.models.defaults import family_defaults
from autodeploy.ops.moe import traceable_experts

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class ModelInfo:
    """What the runtime needs to know about the model, taken from its config once."""

    name: str
    family: str
    vocab_size: int
    num_layers: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    generation_config: Any = None
    tokenizer: Any = None
    defaults: dict = field(default_factory=dict)
    load_notes: list[str] = field(default_factory=list)  # how it was loaded: source, dtype, attention (and why)


class _LogitsOnly(torch.nn.Module):
    """Export wrapper: a plain ``(input_ids, position_ids) -> logits`` signature without HF's cache objects."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


# Named models: ``NAME`` or ``NAME:ARG`` -> loader(arg, dtype, device) -> (model, tokenizer, notes for explain()).
ModelSource = Callable[[Optional[str], Optional[torch.dtype], Optional[torch.device]],
                       tuple[torch.nn.Module, Any, list[str]]]
MODEL_SOURCES: dict[str, ModelSource] = {}
DEFAULT_MODEL = "smollm2"
# model -> (load notes, tokenizer) of the load that built it: passing that model on (the CLI loads, then
# compiles the instance) keeps both.
_LOADED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[list[str], Any]]" = weakref.WeakKeyDictionary()


def load_tokenizer(spec: str) -> Any:
    """A tokenizer by name (``smollm2``) or from a local directory with tokenizer files (``--tokenizer``)."""
    from autodeploy.models import smollm2

    if spec == smollm2.NAME:
        return smollm2.load_tokenizer()
    if not os.path.isdir(spec):
        raise UnsupportedModelError(f"tokenizer {spec!r}: neither {smollm2.NAME!r} nor a local directory")
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(spec)
    except Exception as exc:  # noqa: BLE001 - any loader failure names the directory
        raise UnsupportedModelError(f"tokenizer {spec!r}: no loadable tokenizer there ({type(exc).__name__}: "
                                    f"{exc})") from None


def register_model_source(name: str) -> Callable[[ModelSource], ModelSource]:
    """Make ``load_model(name)`` / ``load_model("name:arg")`` (and ``--model name``) call the decorated loader."""

    def deco(fn: ModelSource) -> ModelSource:
        MODEL_SOURCES[name] = fn
        return fn

    return deco


def _register_builtin_sources() -> None:
    from autodeploy.models import builtin, smollm2

    MODEL_SOURCES.setdefault(smollm2.NAME, smollm2.load)
    MODEL_SOURCES.setdefault("builtin", builtin.load)


_register_builtin_sources()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No "Loading weights" bars or deprecation chatter while we load; the user's settings come back after."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_device(device: Optional[torch.device | str]) -> Optional[torch.device]:
    """Refuse a device this machine does not have before anything is built on it."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UnsupportedModelError(f"device {device!r} is not a valid torch device ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedModelError(f"device {device} requested, but no CUDA device is available here "
                                        "(torch.cuda.is_available() is False); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UnsupportedModelError(f"device {device} requested, but only {torch.cuda.device_count()} CUDA "
                                        "device(s) exist")
    elif device.type not in ("cpu", "meta"):
        log.info("device %s is neither cpu nor cuda; support depends on the backends", device)
    if device.type == "meta":
        raise UnsupportedModelError("device 'meta' holds no weights; compile on 'cpu' or 'cuda'")
    return device


def load_model(model_or_path: Any, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
               attn_implementation: Optional[str] = None,
               deferred_weights: bool = False) -> tuple[torch.nn.Module, Any]:
    """Return ``(model, tokenizer_or_None)``.

    ``model_or_path``: an HF model instance, a local checkpoint directory, or a named model (``smollm2``, the
    default; ``builtin:NAME`` for random-weight configs). What was chosen (attention implementation, dtype and
    why) is kept for ``model_info(...).load_notes`` and the compile report.
    ``deferred_weights`` (a checkpoint directory only): build the model with its real config but without reading
    any weight: parameters are fake tensors (shape, dtype, device; no storage), buffers are real (computed, or
    read from the checkpoint). A tensor-parallel rank exports and shards that, then reads only its slices
    (``models.shard_loading``).
    """
    device = check_device(device)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise UnsupportedModelError(f"dtype {dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    tokenizer = None
    if isinstance(model_or_path, (str, os.PathLike)):
        spec = os.fspath(model_or_path)
        name, _, arg = spec.partition(":")
        if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "config.json")):
            from autodeploy.models import quantized  # pre-quantized: stored weights and scales kept as they are

            if deferred_weights:
                if quantized.is_quantized_checkpoint(spec):
                    raise UnsupportedModelError(f"{spec}: a pre-quantized checkpoint cannot be loaded with deferred "
                                                "weights (its stored scales are read with the weights)")
                model, tokenizer, notes = _load_checkpoint(spec, dtype, attn_implementation, deferred_to=device)
            else:
                load_dir = quantized.load if quantized.is_quantized_checkpoint(spec) else _load_checkpoint
                model, tokenizer, notes = load_dir(spec, dtype, attn_implementation)
            dtype_why = "requested" if dtype is not None else "from the checkpoint config"
        elif deferred_weights:
            raise UnsupportedModelError(f"deferred weights need a local checkpoint directory with a config.json, "
                                        f"got {spec!r}")
        elif name in MODEL_SOURCES and not os.path.isdir(spec):
            with quiet_transformers():
                model, tokenizer, notes = MODEL_SOURCES[name](arg or None, dtype, device)
            dtype_why = "requested" if dtype is not None else "the model's own"
        else:
            raise UnsupportedModelError(
                f"{spec!r} is not a local checkpoint directory with a config.json, nor a named model "
                f"({', '.join(model_names())})")
    elif deferred_weights:
        raise UnsupportedModelError("deferred weights need a local checkpoint directory (an in-memory model or a "
                                    f"named model already holds its weights), got {type(model_or_path).__name__}")
    elif isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
        notes, tokenizer = _LOADED.get(model, (["a model instance"], None))
        dtype_why = "requested" if dtype is not None else next(
            (n[n.index("(") + 1:-1] for n in notes if n.startswith("dtype ")), "the model's own")
    else:
        raise UnsupportedModelError(
            "expected an HF model instance, a checkpoint directory or a model name, got "
            f"{type(model_or_path).__name__}")
    check_supported(model)
    model = model.eval()
    if not deferred_weights:  # a deferred model was built in its dtype, on its device
        _check_materialized(model)
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
    model_dtype = next(model.parameters()).dtype
    if model_dtype not in SUPPORTED_DTYPES:
        raise UnsupportedModelError(f"model dtype {model_dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    impl = getattr(model.config, "_attn_implementation", None) or "default"
    attn = next((n for n in notes if n.startswith("attention implementation")), f"attention implementation {impl}")
    notes = [n for n in notes if not n.startswith(("attention implementation", "dtype "))] + [
        f"dtype {str(model_dtype).replace('torch.', '')} ({dtype_why})", attn]
    _LOADED[model] = (notes, tokenizer)
    return model, tokenizer


def model_names() -> list[str]:
    """Named models for ``load_model`` and the CLI: ``smollm2``, ``builtin:NAME``..."""
    from autodeploy.models.builtin import builtin_names

    names = [n for n in MODEL_SOURCES if n != "builtin"]
    return names + [f"builtin:{n}" for n in builtin_names()]


def _attn_refused(exc: Exception) -> bool:
    text = str(exc)
    return "does not support an attention implementation" in text or "attn_implementation" in text


_NOT_DEFERRED = object()


def _load_checkpoint(path: str, dtype: Optional[torch.dtype], attn_implementation: Optional[str],
                     deferred_to: Any = _NOT_DEFERRED) -> tuple[torch.nn.Module, Any, list[str]]:
    """Load a local HF checkpoint: the dtype from its config unless given, its attention implementation (or
    ``sdpa``), falling back to ``eager`` where HF refuses the requested one for this architecture.
    ``deferred_to``: a device (or None for CPU): build with deferred weights there instead of reading them."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{path}: config.json is not a loadable HF config ({exc})") from None
    _check_config(config, type(config).__name__)
    wanted = attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    why = "requested" if attn_implementation else "the checkpoint's" if wanted != "sdpa" else "default"
    build = _from_pretrained
    if deferred_to is not _NOT_DEFERRED:
        build = functools.partial(_deferred_model, config=config, device=deferred_to)
    with quiet_transformers():
        try:
            model = build(path, dtype, wanted)
        except ValueError as exc:
            if wanted == "eager" or not _attn_refused(exc):
                raise UnsupportedModelError(f"{path}: not loadable as a causal LM ({exc})") from None
            first = str(exc).split(". ")[0]
            log.warning("%s: %s; loading with attn_implementation='eager' instead", path, first)
            model = build(path, dtype, "eager")
            why = f"HF refuses {wanted} here: {first}"
            wanted = "eager"
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # no tokenizer files: token-id prompts still work
            log.info("%s: no tokenizer loaded (%s: %s); prompts must be token ids", path, type(exc).__name__, exc)
            tokenizer = None
    notes = [f"checkpoint {path}", f"attention implementation {wanted} ({why})"]
    if deferred_to is not _NOT_DEFERRED:
        notes.insert(1, "weights deferred: built without reading them (each rank reads only its shard)")
    return model, tokenizer, notes


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered in the block moves to the meta device at once (buffers stay real: RoPE's
    ``inv_freq`` and other computed buffers are not in the checkpoint). With HF's ``no_init_weights`` nothing is
    initialised either, so building even a very large model costs no weight memory. (It patches
    ``nn.Module.register_parameter`` for the duration: build nothing else on another thread meanwhile.)"""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: Optional[torch.nn.Parameter]) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _deferred_model(path: str, dtype: Optional[torch.dtype], attn_implementation: str, *, config: Any,
                    device: Optional[torch.device]) -> torch.nn.Module:
    """The model of ``config`` with deferred weights: each parameter a fake tensor on ``device`` (tied
    parameters stay one tensor), each buffer real; persistent buffers are read from the checkpoint."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    from autodeploy.models import shard_loading

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x
        from transformers.modeling_utils import no_init_weights
    dtype = dtype or shard_loading.config_dtype(config)
    with no_init_weights(), _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
            getattr(model.config, "get_text_config", lambda: None)(), "tie_word_embeddings", False):
        model.tie_weights()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    target = device if device is not None else torch.device("cpu")
    fakes: dict[int, torch.nn.Parameter] = {}
    for sub in model.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) not in fakes:
                with mode:
                    fake = torch.empty(p.shape, dtype=p.dtype, device=target)
                fakes[id(p)] = torch.nn.Parameter(fake, requires_grad=False)
            sub._parameters[name] = fakes[id(p)]
    for sub in model.modules():  # the buffers (the fake parameters are already there)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.device != target:
                sub._buffers[name] = b.to(target)
    shard_loading.load_buffers(model, path)
    return model


def _from_pretrained(path: str, dtype: Optional[torch.dtype], attn_implementation: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto",
                                                    attn_implementation=attn_implementation)
    except ValueError:
        raise
    except Exception as exc:
        bad = _corrupt_weight_file(path)
        if bad is not None:
            raise UnsupportedModelError(f"{bad}: the weight file is corrupt or truncated ({bad_reason(bad)})") from None
        raise UnsupportedModelError(f"{path}: loading the weights failed ({type(exc).__name__}: {exc})") from None


def _corrupt_weight_file(path: str) -> Optional[str]:
    """The first *.safetensors file in ``path`` whose header or size is broken, or None."""
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors") and bad_reason(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def bad_reason(file: str) -> str:
    """Why ``file`` is not a readable safetensors file ('' when it is)."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _check_materialized(model: torch.nn.Module) -> None:
    """Weights on the meta device have no values: refuse them by name before export turns it into a torch error."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise UnsupportedModelError(
                f"{type(model).__name__} has weights on the meta device (e.g. {name}): they hold no values. Load "
                "real weights first (from_pretrained without a meta device_map, or load_state_dict(..., assign=True))")


def _check_config(config: Any, name: str) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; autodeploy compiles decoder-only causal LMs")


def check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{name} has no HF config; pass a transformers PreTrainedModel")
    _check_config(config, name)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if not can_generate or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"{name} is not a causal language model (encoder-only or headless); autodeploy compiles decoder-only "
            "causal LMs such as *ForCausalLM")


def model_info(model: torch.nn.Module, tokenizer: Any = None) -> ModelInfo:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(text, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    family = getattr(text, "model_type", "unknown")
    param = next(model.parameters())
    return ModelInfo(
        name=type(model).__name__, family=family, vocab_size=int(text.vocab_size),
        num_layers=int(getattr(text, "num_hidden_layers", getattr(text, "n_layer", 0)) or 0),
        dtype=param.dtype, device=param.device, eos_token_ids=eos_ids,
        pad_token_id=getattr(gen, "pad_token_id", None) if gen is not None else None,
        max_position_embeddings=getattr(text, "max_position_embeddings", getattr(text, "n_positions", None)),
        generation_config=gen, tokenizer=tokenizer, defaults=family_defaults(family),
        load_notes=list(_LOADED.get(model, ([], None))[0]),
    )


def export_model(model: torch.nn.Module, max_batch_size: int, max_seq_len: int, max_num_tokens: int) -> fx.GraphModule:
    """torch.export with dynamic batch and sequence dims; returns a plain-signature GraphModule."""
    device = next(model.parameters()).device
    example_len = 4
    ids = torch.zeros(2, example_len, dtype=torch.long, device=device)
    pos = torch.arange(example_len, device=device).expand(2, example_len).contiguous()
    # Dim.DYNAMIC with deferred runtime asserts: some torch versions (2.11) emit shape guards their solver
    # cannot prove over a named range (e.g. ``min(32*s, 128*s) == 32*s``) and reject the export. The guards are
    # kept as runtime asserts in the graph instead, and the cleanup pass drops them.
    dyn = Dim.DYNAMIC
    dynamic = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn})
    try:
        # experts modules HF writes as a data-dependent loop (DBRX) export through the canonical MoE op
        with torch.no_grad(), traceable_experts(model):
            ep = torch.export.export(_LogitsOnly(model), (ids, pos), dynamic_shapes=dynamic, strict=False,
                                     prefer_deferred_runtime_asserts_over_guards=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedModelError(
            f"torch.export failed for {type(model).__name__}: {type(exc).__name__}: {first}") from exc
    unlifted = ep.module()
    # A fresh GraphModule drops export's pytree signature and input-constraint hooks: the cached graph gets
    # new inputs and a flattened token layout those checks know nothing about.
    graph = unlifted.graph
    graph._codegen = fx.graph.CodeGen()
    gm = fx.GraphModule(unlifted, graph)
    gm.meta.update(getattr(unlifted, "meta", {}))
    _rebind_deferred(gm)
    return gm


def _rebind_deferred(gm: fx.GraphModule) -> None:
    """Deferred weights (fake tensors of the loader's mode) become the fake values export recorded for their
    get_attr nodes: one fake mode for the whole graph, so passes that cut or concatenate weights and re-derive
    shapes (``mode.from_tensor``) work on them as on real ones."""
    from autodeploy.graph.probe_weights import is_deferred

    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, name = node.target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        store = mod._parameters if name in mod._parameters else mod._buffers if name in mod._buffers else None
        fake = node.meta.get("val")
        if store is None or not is_deferred(store[name]) or not isinstance(fake, torch.Tensor):
            continue
        store[name] = torch.nn.Parameter(fake, requires_grad=False) if store is mod._parameters else fake
