"""One frozen config for a Llama-3 model, built from Meta's `params.json` or Hugging Face's `config.json`.

Nothing else in the package parses those files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HarnessError

if TYPE_CHECKING:
    import torch

# Meta's llama-models hard-codes these for `use_scaled_rope` (Llama 3.1 and 3.2).
META_ROPE_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency scaling: long wavelengths divided by `factor`, short ones kept."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    max_seq_len: int
    head_dim: int
    # kept so that params.json can be written back as it was read
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None

    def __post_init__(self) -> None:
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "head_dim", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise HarnessError(f"config: {field} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise HarnessError(f"config: n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise HarnessError(f"config: head_dim ({self.head_dim}) must be even for RoPE")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise HarnessError(
                f"config: norm_eps ({self.norm_eps}) and rope_theta ({self.rope_theta}) must be positive"
            )

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (the notebook's hard-coded 4)."""
        return self.n_heads // self.n_kv_heads

    @property
    def rope_scaling_factor(self) -> float | None:
        return self.rope_scaling.factor if self.rope_scaling else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


def ffn_dim_from_meta(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, times the multiplier, rounded up to `multiple_of` (8B: 14336)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HarnessError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HarnessError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _require(data: dict[str, Any], key: str, path: Path, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise HarnessError(f"{path}: required key {key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise HarnessError(f"{path}: key {key!r} has the wrong type ({value!r})")
    return value


def _optional(data: dict[str, Any], key: str, path: Path, kind: type | tuple[type, ...], default: Any) -> Any:
    return default if data.get(key) is None else _require(data, key, path, kind)


def _build(path: Path, **fields: Any) -> ModelConfig:
    """ModelConfig(**fields), its own checks reported against the file they came from."""
    try:
        return ModelConfig(**fields)
    except HarnessError as e:
        raise HarnessError(f"{path}: {str(e).removeprefix('config: ')}") from None


def config_from_params_json(path: Path, *, tie_word_embeddings: bool = False) -> ModelConfig:
    """Meta's params.json (`dim`, `n_layers`, `n_heads`, ...); `use_scaled_rope` turns on 3.1 scaling.

    Meta's file has no tie flag: the checkpoint reader decides from the tensors and passes it in.
    """
    path = Path(path)
    p = _read_json(path)
    dim = _require(p, "dim", path, int)
    n_heads = _require(p, "n_heads", path, int)
    multiple_of = _require(p, "multiple_of", path, int)
    multiplier = _optional(p, "ffn_dim_multiplier", path, (int, float), None)
    scaling = None
    if p.get("use_scaled_rope"):
        # Meta's code hard-codes factor 8; a `rope_scaling_factor` key, where present, says otherwise.
        factor = _optional(p, "rope_scaling_factor", path, (int, float), 8.0)
        scaling = RopeScaling(**{**META_ROPE_SCALING, "factor": float(factor)})
    if n_heads <= 0 or dim % n_heads:
        raise HarnessError(f"{path}: dim ({dim}) must be divisible by n_heads ({n_heads})")
    return _build(
        path,
        dim=dim,
        n_layers=_require(p, "n_layers", path, int),
        n_heads=n_heads,
        n_kv_heads=_optional(p, "n_kv_heads", path, int, n_heads),
        vocab_size=_require(p, "vocab_size", path, int),
        ffn_dim=ffn_dim_from_meta(dim, multiple_of, multiplier),
        norm_eps=float(_require(p, "norm_eps", path, (int, float))),
        rope_theta=float(_optional(p, "rope_theta", path, (int, float), 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings=tie_word_embeddings,
        max_seq_len=_optional(p, "max_seq_len", path, int, 131072 if scaling else 8192),
        head_dim=dim // n_heads,
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
    )


def config_from_hf_json(path: Path) -> ModelConfig:
    """Hugging Face's config.json for `LlamaForCausalLM`; `rope_parameters` (5.x) or `rope_scaling` (4.x)."""
    path = Path(path)
    c = _read_json(path)
    if c.get("model_type", "llama") != "llama":
        raise HarnessError(f"{path}: model_type is {c['model_type']!r}, expected 'llama'")
    dim = _require(c, "hidden_size", path, int)
    n_heads = _require(c, "num_attention_heads", path, int)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise HarnessError(f"{path}: rope_parameters / rope_scaling must be a JSON object, got {rope!r}")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise HarnessError(f"{path}: key 'rope_theta' has the wrong type ({theta!r})")
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        try:
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise HarnessError(f"{path}: llama3 rope scaling is missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise HarnessError(f"{path}: llama3 rope scaling has a value of the wrong type ({e})") from None
    elif rope.get("rope_type", "default") not in ("default", None):
        raise HarnessError(f"{path}: rope_type {rope.get('rope_type')!r} is not supported (default or llama3)")
    if n_heads <= 0 or dim % n_heads:
        raise HarnessError(f"{path}: hidden_size ({dim}) must be divisible by num_attention_heads ({n_heads})")
    head_dim = _optional(c, "head_dim", path, int, dim // n_heads)
    if head_dim * n_heads != dim:
        raise HarnessError(f"{path}: head_dim ({head_dim}) * num_attention_heads ({n_heads}) != hidden_size ({dim})")
    return _build(
        path,
        dim=dim,
        n_layers=_require(c, "num_hidden_layers", path, int),
        n_heads=n_heads,
        n_kv_heads=_optional(c, "num_key_value_heads", path, int, n_heads),
        vocab_size=_require(c, "vocab_size", path, int),
        ffn_dim=_require(c, "intermediate_size", path, int),
        norm_eps=float(_require(c, "rms_norm_eps", path, (int, float))),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_seq_len=_optional(c, "max_position_embeddings", path, int, 8192),
        head_dim=head_dim,
    )


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim // 2] in float32, with 3.1 scaling applied when configured.

    The notebook: `1.0 / (rope_theta ** (torch.tensor(range(64)) / 64))`, generalised to head_dim. float32 as the
    notebook (and Meta, and HF's inv_freq) compute them, even for a float64 run: the frequencies are part of the model.
    """
    import torch

    half = config.head_dim // 2
    freqs = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))  # [half]
    s = config.rope_scaling
    if s is None:
        return freqs
    # Meta's apply_scaling: keep short wavelengths, divide long ones by the factor, mix in between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freqs  # [half]
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, freqs)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    mixed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, mixed, scaled)
