"""Recipes: the per-model K/V quantization settings of tqpatch, one ``.safetensors`` file each.

A recipe says, for every decoder layer, how its keys and values are stored: the TurboQuant bits
(``16`` keeps the layer in bf16), optional outlier channels quantized at their own bits (fractional
bits), the rotation seed, an optional key-smoothing channel scale and the number of recent tokens
kept in full precision. It also records which model it was made for (``model_type`` and the layer
shapes, checked by :meth:`Recipe.validate_for`) and where its numbers come from (``provenance``,
``quality``).

File format (version 1), tensors with one row per layer (``L`` layers, ``H`` KV heads, head dim
``d``, ``n`` outlier channels):

=========================  ============  =========================================================
tensor                     dtype, shape  meaning
=========================  ============  =========================================================
``key_bits``               int8 [L]      TurboQuant bits of the keys, 1..8, or 16 = keep bf16
``value_bits``             int8 [L]      the same for the values
``rotation_seed``          int64 [L]     seed of the layer's random rotation
``window``                 int32 [L]     most recent tokens kept in full precision (>= 0)
``key_outlier_channels``   int16 [L,H,n] optional: channels quantized at ``key_outlier_bits``
``key_outlier_bits``       int8 [L]      with the above: 1..8, or 0 = no split in this layer
``value_outlier_channels`` int16 [L,H,n] optional, as for keys
``value_outlier_bits``     int8 [L]      with the above
``key_channel_scale``      float32       optional [L,H,d]: the diagonal D of key smoothing
                                         (keys stored as quantize(D^-1 k), queries as D q)
=========================  ============  =========================================================

Metadata (all strings): ``format`` = ``"tqpatch-recipe"``, ``format_version`` (``"1"``),
``model_type``, ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``, ``source_model``,
``source_revision`` (optional), ``provenance`` (JSON object with ``kind`` one of ``"calibrated"``,
``"published"``, ``"uniform"``, ``"custom"``), ``quality`` (JSON object), ``rotation``
(``"haar"`` | ``"hadamard"``) and ``created_with`` (the tqpatch version). Rows of the outlier
channel tensors for layers without a split are ignored (fill them with ``-1``).

Files are read and written with :mod:`safetensors` only; nothing is ever unpickled.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import re
import struct
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch

from . import packing

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

__all__ = [
    "Recipe",
    "LayerSettings",
    "list_recipes",
    "RecipeError",
    "RecipeFileError",
    "NotARecipeError",
    "RecipeVersionError",
    "RecipeSchemaError",
    "RecipeMismatchError",
    "RecipeNotFoundError",
    "RecipeHubError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DEFAULT_FILENAME",
    "BF16_BITS",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "tqpatch-recipe"
"""Value of the ``format`` metadata key of every recipe file."""
FORMAT_VERSION = 1
"""The recipe format version this tqpatch writes and the newest one it reads."""
DEFAULT_FILENAME = "recipe.safetensors"
"""File name used in a Hub repository when none is given."""
BF16_BITS = 16
"""Bits value meaning "keep this layer's keys (or values) in bf16"."""

ROTATIONS = ("haar", "hadamard")
PROVENANCE_KINDS = ("calibrated", "published", "uniform", "custom")
_MAX_HEADER_BYTES = 100_000_000

PerLayer = Union[torch.Tensor, Sequence[int], int]
"""A per-layer value as accepted by :class:`Recipe`: a tensor, a sequence, or one int for all layers."""
_BUNDLED_PACKAGE = "tqpatch.recipes"

# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
class RecipeError(ValueError):
    """Base class of every recipe problem (a ``ValueError``)."""


class RecipeFileError(RecipeError):
    """The file is missing its safetensors structure: truncated, corrupt or not safetensors."""


class NotARecipeError(RecipeError):
    """A valid safetensors file that is not a tqpatch recipe (no ``format=tqpatch-recipe``)."""


class RecipeVersionError(RecipeError):
    """The recipe was written in a newer format version than this tqpatch reads."""


class RecipeSchemaError(RecipeError):
    """A tensor or metadata entry has the wrong name, dtype, shape or value."""


class RecipeMismatchError(RecipeError):
    """The recipe was made for a model of another shape.

    Attributes:
        mismatches: ``{field: (recipe value, model value)}`` for every differing field, in the
            order ``model_type``, ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``.
        field: the first differing field.
    """

    def __init__(self, message: str, mismatches: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.mismatches = mismatches
        self.field = next(iter(mismatches)) if mismatches else None


class RecipeNotFoundError(RecipeError):
    """No recipe under that name, path or Hub reference."""


class RecipeHubError(RecipeError):
    """The Hugging Face Hub could not be used (server error, no connection, rejected upload)."""


# ------------------------------------------------------------------------------------------------
# schema
# ------------------------------------------------------------------------------------------------
_ST_DTYPES = {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "F32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}

# name -> (dtype, symbolic shape); "L" layers, "H" KV heads, "d" head dim, "n" outlier channels
_TENSORS: dict[str, tuple[torch.dtype, tuple[str, ...]]] = {
    "key_bits": (torch.int8, ("L",)),
    "value_bits": (torch.int8, ("L",)),
    "rotation_seed": (torch.int64, ("L",)),
    "window": (torch.int32, ("L",)),
    "key_outlier_channels": (torch.int16, ("L", "H", "n")),
    "key_outlier_bits": (torch.int8, ("L",)),
    "value_outlier_channels": (torch.int16, ("L", "H", "n")),
    "value_outlier_bits": (torch.int8, ("L",)),
    "key_channel_scale": (torch.float32, ("L", "H", "d")),
}
_REQUIRED_TENSORS = ("key_bits", "value_bits", "rotation_seed", "window")
_REQUIRED_METADATA = (
    "format",
    "format_version",
    "model_type",
    "num_hidden_layers",
    "num_key_value_heads",
    "head_dim",
    "rotation",
    "provenance",
)
_KNOWN_METADATA = set(_REQUIRED_METADATA) | {"source_model", "source_revision", "quality", "created_with"}

_WHAT_TO_DO_REGENERATE = (
    "Re-create the recipe (tqpatch.Recipe.uniform(config).save(path) or `tqpatch calibrate`), "
    "or download it again if it came from the Hub."
)


def _tqpatch_version() -> str:
    import tqpatch  # late import: this module may be imported while tqpatch initialises

    return str(getattr(tqpatch, "__version__", "unknown"))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and not (n & (n - 1))


def _fmt_bits(b: int) -> str:
    return "bf16" if b == BF16_BITS else str(b)


def _coerce(name: str, value: Any, dtype: torch.dtype, shape: tuple[int, ...] | None) -> torch.Tensor:
    """Turn ``value`` (tensor, sequence or scalar) into a CPU tensor of ``dtype`` without changing
    any value; a scalar is broadcast to ``shape``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise RecipeSchemaError(f"{name}: cannot make a tensor of {value!r} ({e})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise RecipeSchemaError(f"{name}: expected {dtype} values, got {t.dtype}")
    if dtype.is_floating_point:
        out = t.to(dtype)
    else:
        if t.dtype.is_floating_point:
            if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
                raise RecipeSchemaError(f"{name}: expected integers, got non-integer values")
        info = torch.iinfo(dtype)
        if t.numel() and (t.min().item() < info.min or t.max().item() > info.max):
            raise RecipeSchemaError(
                f"{name}: values {t.min().item()}..{t.max().item()} do not fit {dtype} ({info.min}..{info.max})"
            )
        out = t.to(dtype)
    if shape is not None and out.ndim == 0:
        out = out.expand(shape)
    if shape is not None and tuple(out.shape) != tuple(shape):
        raise RecipeSchemaError(f"{name}: expected shape {list(shape)}, got {list(out.shape)}")
    return out.contiguous().clone()


def _check_json_object(name: str, value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise RecipeSchemaError(f"{name} must be a JSON object (a dict), got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RecipeSchemaError(f"{name} must hold only JSON values (str, numbers, lists, dicts): {e}") from None
    return dict(value)


# ------------------------------------------------------------------------------------------------
# per-layer view
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSettings:
    """The settings of one layer (see :meth:`Recipe.layer`).

    Attributes:
        key_bits, value_bits: 1..8, or 16 = bf16.
        key_outlier_channels, value_outlier_channels: ``int64 [H, n]`` channel indices quantized
            at ``*_outlier_bits``, or ``None`` when this layer has no split.
        key_outlier_bits, value_outlier_bits: bits of the outlier channels (``0`` when no split).
        rotation_seed: seed of the layer's rotation.
        window: recent tokens kept in full precision.
        key_channel_scale: ``float32 [H, d]`` key-smoothing scale, or ``None``.
    """

    key_bits: int
    value_bits: int
    key_outlier_channels: torch.Tensor | None
    key_outlier_bits: int
    value_outlier_channels: torch.Tensor | None
    value_outlier_bits: int
    rotation_seed: int
    window: int
    key_channel_scale: torch.Tensor | None


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False, repr=False)
class Recipe:
    """Per-layer K/V quantization settings for one model shape.

    Construct one with :meth:`uniform`, :meth:`load` (bundled name, path or Hub reference) or
    directly. Per-layer arguments accept tensors, sequences or one scalar for every layer; they are
    stored as CPU tensors of the format's dtypes (values are never silently changed). A
    ``Recipe`` is validated on construction, so an existing one is always well formed.

    Args:
        model_type: ``config.model_type`` of the model family (``"llama"``, ``"qwen2"``, ...).
        num_hidden_layers, num_key_value_heads, head_dim: the model's shape.
        key_bits, value_bits: per layer, 1..8, or 16 to keep the layer in bf16.
        rotation_seed: per-layer rotation seeds (default ``0, 1, ..., L-1``).
        window: per layer, recent tokens kept in full precision (default 0).
        rotation: ``"haar"`` (dense Haar-random) or ``"hadamard"`` (randomized Hadamard; needs
            power-of-two dimensions).
        key_outlier_channels, key_outlier_bits: optional fractional-bit split of the keys: int
            ``[L, H, n]`` channel indices quantized at ``key_outlier_bits[l]`` bits (0 = no split
            in layer ``l``), the other ``d - n`` channels at ``key_bits[l]``.
        value_outlier_channels, value_outlier_bits: the same for the values.
        key_channel_scale: optional ``[L, H, d]`` positive key-smoothing scale.
        source_model, source_revision: the Hub id (and revision) of the model the recipe is for.
        provenance: JSON object; ``provenance["kind"]`` is ``"calibrated"``, ``"published"``,
            ``"uniform"`` or ``"custom"``, the rest says how it was made.
        quality: JSON object of measured quality (shown in :meth:`to_table` and the model card).
        created_with: tqpatch version that made the recipe (default: this one).
        extra_metadata: metadata entries this version does not know, kept for round trips.

    After construction every per-layer field is a CPU tensor (``key_bits``/``value_bits``/
    ``*_outlier_bits`` int8 ``[L]``, ``rotation_seed`` int64 ``[L]``, ``window`` int32 ``[L]``,
    ``*_outlier_channels`` int16 ``[L, H, n]``, ``key_channel_scale`` float32 ``[L, H, d]``).

    Raises:
        RecipeSchemaError: a field has a wrong type, shape or value; the message names it.
    """

    model_type: str
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    key_bits: PerLayer
    value_bits: PerLayer
    rotation_seed: Optional[PerLayer] = None
    window: PerLayer = 0
    rotation: str = "haar"
    key_outlier_channels: Optional[torch.Tensor] = None
    key_outlier_bits: Optional[PerLayer] = None
    value_outlier_channels: Optional[torch.Tensor] = None
    value_outlier_bits: Optional[PerLayer] = None
    key_channel_scale: Optional[torch.Tensor] = None
    source_model: str = ""
    source_revision: str | None = None
    provenance: dict = field(default_factory=lambda: {"kind": "custom"})
    quality: dict = field(default_factory=dict)
    created_with: str = field(default_factory=_tqpatch_version)
    extra_metadata: dict = field(default_factory=dict)

    # -- construction and validation -------------------------------------------------------------
    def validate(self) -> None:
        """Check (and normalise) every field again, e.g. after editing a recipe in place.

        Raises:
            RecipeSchemaError: naming the field and the problem.
        """
        self.__post_init__()

    def __post_init__(self) -> None:
        for name in ("num_hidden_layers", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                try:
                    iv = int(v)
                except (TypeError, ValueError):
                    raise RecipeSchemaError(f"{name} must be an integer, got {v!r}") from None
                if iv != v:
                    raise RecipeSchemaError(f"{name} must be an integer, got {v!r}")
                setattr(self, name, iv)
        if self.num_hidden_layers < 1:
            raise RecipeSchemaError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if self.num_key_value_heads < 1:
            raise RecipeSchemaError(f"num_key_value_heads must be >= 1, got {self.num_key_value_heads}")
        if self.head_dim < 2:
            raise RecipeSchemaError(f"head_dim must be >= 2, got {self.head_dim}")
        if not isinstance(self.model_type, str) or not self.model_type:
            raise RecipeSchemaError(f"model_type must be a non-empty string, got {self.model_type!r}")
        L, H, d = self.num_hidden_layers, self.num_key_value_heads, self.head_dim
        self.key_bits = _coerce("key_bits", self.key_bits, torch.int8, (L,))
        self.value_bits = _coerce("value_bits", self.value_bits, torch.int8, (L,))
        if self.rotation_seed is None:
            self.rotation_seed = torch.arange(L, dtype=torch.int64)
        self.rotation_seed = _coerce("rotation_seed", self.rotation_seed, torch.int64, (L,))
        self.window = _coerce("window", self.window, torch.int32, (L,))
        for kind in ("key", "value"):
            ch_name, b_name = f"{kind}_outlier_channels", f"{kind}_outlier_bits"
            ch, b = getattr(self, ch_name), getattr(self, b_name)
            if (ch is None) != (b is None):
                missing, given = (b_name, ch_name) if b is None else (ch_name, b_name)
                raise RecipeSchemaError(f"{given} is set but {missing} is not: give both or neither")
            if ch is not None:
                ch = _coerce(ch_name, ch, torch.int16, None)
                if ch.ndim != 3 or ch.shape[0] != L or ch.shape[1] != H:
                    raise RecipeSchemaError(f"{ch_name}: expected shape [{L}, {H}, n], got {list(ch.shape)}")
                setattr(self, ch_name, ch)
                setattr(self, b_name, _coerce(b_name, b, torch.int8, (L,)))
        if self.key_channel_scale is not None:
            self.key_channel_scale = _coerce("key_channel_scale", self.key_channel_scale, torch.float32, (L, H, d))
        if self.source_revision is not None and not isinstance(self.source_revision, str):
            raise RecipeSchemaError(f"source_revision must be a string or None, got {self.source_revision!r}")
        if self.source_model is None:
            self.source_model = ""
        for name in ("source_model", "created_with", "rotation"):
            if not isinstance(getattr(self, name), str):
                raise RecipeSchemaError(f"{name} must be a string, got {getattr(self, name)!r}")
        self.provenance = _check_json_object("provenance", self.provenance)
        self.quality = _check_json_object("quality", self.quality)
        if not isinstance(self.extra_metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.extra_metadata.items()
        ):
            raise RecipeSchemaError("extra_metadata must map strings to strings")
        self.extra_metadata = dict(self.extra_metadata)
        clash = _KNOWN_METADATA.intersection(self.extra_metadata)
        if clash:
            raise RecipeSchemaError(f"extra_metadata may not redefine {sorted(clash)}; set the fields instead")
        self._validate_values()

    def _validate_values(self) -> None:
        d = self.head_dim
        if self.rotation not in ROTATIONS:
            raise RecipeSchemaError(f"rotation must be 'haar' or 'hadamard', got {self.rotation!r}")
        kind = self.provenance.get("kind")
        if kind not in PROVENANCE_KINDS:
            raise RecipeSchemaError(
                f"provenance['kind'] must be one of {list(PROVENANCE_KINDS)}, got {kind!r}"
            )
        for name in ("key_bits", "value_bits"):
            t: torch.Tensor = getattr(self, name)
            for layer, b in enumerate(t.tolist()):
                if b != BF16_BITS and not 1 <= b <= 8:
                    raise RecipeSchemaError(
                        f"{name}[{layer}] = {b}: bits must be 1..8, or 16 to keep the layer in bf16"
                    )
                if b != BF16_BITS and b * d % 8:
                    raise RecipeSchemaError(
                        f"{name}[{layer}] = {b}: {d} codes of {b} bits do not fill whole bytes "
                        f"(head_dim must be a multiple of {packing.group_size(b)} at {b} bits)"
                    )
        if self.rotation == "hadamard" and not _is_power_of_two(d):
            raise RecipeSchemaError(
                f"rotation='hadamard' needs a power-of-two head_dim, this recipe has {d}: use rotation='haar'"
            )
        w = self.window
        if bool((w < 0).any()):
            layer = int(torch.nonzero(w < 0)[0, 0])
            raise RecipeSchemaError(f"window[{layer}] = {int(w[layer])}: the window must be >= 0 tokens")
        for kind_ in ("key", "value"):
            self._validate_split(kind_)
        s = self.key_channel_scale
        if s is not None and not bool((torch.isfinite(s) & (s > 0)).all()):
            bad = torch.nonzero(~(torch.isfinite(s) & (s > 0)))[0].tolist()
            raise RecipeSchemaError(
                f"key_channel_scale[{bad[0]}, {bad[1]}, {bad[2]}] = {s[tuple(bad)].item()}: "
                "the key-smoothing scale must be finite and > 0"
            )

    def _validate_split(self, kind: str) -> None:
        ch: torch.Tensor | None = getattr(self, f"{kind}_outlier_channels")
        if ch is None:
            return
        bits: torch.Tensor = getattr(self, f"{kind}_outlier_bits")
        main: torch.Tensor = getattr(self, f"{kind}_bits")
        d, n = self.head_dim, ch.shape[2]
        for layer in range(self.num_hidden_layers):
            ob, mb = int(bits[layer]), int(main[layer])
            where = f"{kind}_outlier_bits[{layer}] = {ob}"
            if ob == 0 or mb == BF16_BITS:
                if not 0 <= ob <= 8:
                    raise RecipeSchemaError(f"{where}: outlier bits must be 0 (no split) or 1..8")
                continue
            if not 1 <= ob <= 8:
                raise RecipeSchemaError(f"{where}: outlier bits must be 0 (no split) or 1..8")
            if not 2 <= n <= d - 2:
                raise RecipeSchemaError(
                    f"{kind}_outlier_channels: a split layer needs between 2 and {d - 2} outlier channels "
                    f"per head, the tensor has {n}"
                )
            for part, size, b in (("outlier", n, ob), ("regular", d - n, mb)):
                if size % packing.group_size(b):
                    raise RecipeSchemaError(
                        f"layer {layer} {kind}s: {size} {part} channels at {b} bits do not fill whole bytes "
                        f"(use a multiple of {packing.group_size(b)} channels)"
                    )
                if self.rotation == "hadamard" and not _is_power_of_two(size):
                    raise RecipeSchemaError(
                        f"layer {layer} {kind}s: rotation='hadamard' needs power-of-two parts, the split has "
                        f"{part} part {size}; use rotation='haar'"
                    )
            rows = ch[layer].to(torch.int64)
            if bool(((rows < 0) | (rows >= d)).any()):
                raise RecipeSchemaError(
                    f"{kind}_outlier_channels[{layer}]: channel indices must lie in [0, {d}) "
                    f"(got {rows.min().item()}..{rows.max().item()})"
                )
            for h in range(rows.shape[0]):
                if torch.unique(rows[h]).numel() != n:
                    raise RecipeSchemaError(f"{kind}_outlier_channels[{layer}, {h}]: channel indices must be distinct")

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        config_or_model: Any,
        key_bits: int = 4,
        value_bits: int = 4,
        window: int = 0,
        rotation: str = "haar",
        seed: int = 0,
        skip_layers: Sequence[int] = (),
    ) -> "Recipe":
        """The same bits in every layer, built from a transformers config (or a model).

        Args:
            config_or_model: a ``PretrainedConfig`` or a model with ``.config`` (multimodal
                configs: the text config is used).
            key_bits, value_bits: bits for every layer (1..8, or 16 for bf16).
            window: recent full-precision tokens in every layer.
            rotation: ``"haar"`` or ``"hadamard"``.
            seed: layer ``l`` gets rotation seed ``seed + l``.
            skip_layers: layers kept in bf16 (bits 16); negative indices count from the end.

        Returns:
            A recipe with provenance ``{"kind": "uniform", ...}``.
        """
        shape = _model_shape(config_or_model)
        L = shape["num_hidden_layers"]
        kb = torch.full((L,), int(key_bits), dtype=torch.int64)
        vb = torch.full((L,), int(value_bits), dtype=torch.int64)
        skipped = []
        for s in skip_layers:
            i = int(s)
            if not -L <= i < L:
                raise ValueError(f"skip_layers: layer {s} does not exist in a model of {L} layers")
            skipped.append(i % L)
        skipped = sorted(set(skipped))
        kb[skipped] = BF16_BITS
        vb[skipped] = BF16_BITS
        cfg = _config_of(config_or_model)
        return cls(
            model_type=shape["model_type"],
            num_hidden_layers=L,
            num_key_value_heads=shape["num_key_value_heads"],
            head_dim=shape["head_dim"],
            key_bits=kb,
            value_bits=vb,
            rotation_seed=torch.arange(L, dtype=torch.int64) + int(seed),
            window=int(window),
            rotation=rotation,
            source_model=str(getattr(cfg, "name_or_path", "") or ""),
            source_revision=getattr(cfg, "_commit_hash", None) or None,
            provenance={
                "kind": "uniform",
                "key_bits": int(key_bits),
                "value_bits": int(value_bits),
                "window": int(window),
                "seed": int(seed),
                "skip_layers": skipped,
            },
        )

    @classmethod
    def load(
        cls,
        name_or_path: "str | os.PathLike[str] | Recipe",
        revision: str | None = None,
        *,
        token: str | bool | None = None,
    ) -> "Recipe":
        """Load a recipe by bundled name, local path or Hub reference.

        Resolution order: an existing local file (or a directory holding ``recipe.safetensors``
        or exactly one ``.safetensors`` file), then a bundled name (:func:`list_recipes`), then a
        Hub reference ``"org/repo"`` (file ``recipe.safetensors``) or
        ``"org/repo/path/file.safetensors"``.

        Args:
            name_or_path: the name, path or Hub reference (a ``Recipe`` is returned as is).
            revision: branch, tag or commit for a Hub reference (default: ``main``).
            token: Hub token for private repositories (default: the logged-in token).

        Raises:
            RecipeNotFoundError: nothing under that name, path or reference.
            RecipeFileError, NotARecipeError, RecipeVersionError, RecipeSchemaError: the file
                is not a valid recipe; the message says what is wrong.
            RecipeHubError: the Hub could not be reached and no cached copy exists.
        """
        if isinstance(name_or_path, Recipe):
            return name_or_path
        ref = os.fspath(name_or_path)
        if not isinstance(ref, str) or not ref:
            raise RecipeNotFoundError(f"expected a recipe name, path or Hub reference, got {name_or_path!r}")
        local = Path(ref).expanduser()
        if local.exists():
            _no_revision(revision, ref, "a local path")
            return cls._load_local(local)
        bundled = _bundled_names()
        if ref in bundled:
            _no_revision(revision, ref, "a bundled recipe")
            with importlib.resources.as_file(importlib.resources.files(_BUNDLED_PACKAGE) / f"{ref}.safetensors") as p:
                return cls._load_file(Path(p), display=f"bundled recipe '{ref}'")
        hub = _parse_hub_ref(ref)
        if hub is not None:
            repo_id, filename = hub
            try:
                return cls.from_hub(repo_id, filename, revision=revision, token=token)
            except RecipeNotFoundError as e:
                raise RecipeNotFoundError(
                    f"{e} ('{ref}' is not a local file or a bundled recipe either, so it was read as a Hub reference.)"
                ) from e.__cause__
        hint = f" Bundled recipes: {', '.join(bundled)}." if bundled else ""
        if ref.endswith(".safetensors") or os.sep in ref or ref.startswith("."):
            raise RecipeNotFoundError(
                f"no recipe file at '{ref}': the path does not exist. Check the path; a Hub reference "
                f"has the form 'org/repo' or 'org/repo/file.safetensors'.{hint}"
            )
        raise RecipeNotFoundError(
            f"no bundled recipe named '{ref}' and no such file.{hint} Make one with "
            "tqpatch.Recipe.uniform(model.config) or `tqpatch calibrate`, or pass a path or a Hub "
            "reference 'org/repo'."
        )

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        filename: str | None = None,
        revision: str | None = None,
        *,
        token: str | bool | None = None,
        cache_dir: "str | os.PathLike[str] | None" = None,
        local_files_only: bool = False,
    ) -> "Recipe":
        """Download (or take from the Hugging Face cache) a recipe file from a Hub model repo.

        Honours ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` (then only
        the cache is used) like every huggingface_hub download.

        Args:
            repo_id: ``"org/repo"``.
            filename: path of the file in the repo (default ``recipe.safetensors``).
            revision: branch, tag or commit sha (default ``main``).
            token: Hub token for private repos.
            cache_dir: Hugging Face cache directory (default: the standard one).
            local_files_only: use the cache only.

        Raises:
            RecipeNotFoundError: the repo, revision or file does not exist.
            RecipeHubError: the Hub failed (e.g. HTTP 500) or cannot be reached, with no cached copy.
            RecipeError subclasses: the downloaded file is not a valid recipe.
        """
        from huggingface_hub import hf_hub_download

        errors = _hub_errors()
        fname = filename or DEFAULT_FILENAME
        where = f"'{fname}' in Hub repo '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
        try:
            path = hf_hub_download(
                repo_id,
                fname,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                library_name="tqpatch",
                library_version=_tqpatch_version(),
            )
        except errors["LocalEntryNotFoundError"] as e:
            if local_files_only or _hub_offline():
                raise RecipeNotFoundError(
                    f"{where} is not in the local Hugging Face cache and downloads are disabled "
                    "(HF_HUB_OFFLINE=1 or local_files_only=True). Download it once with network access, "
                    "or unset HF_HUB_OFFLINE."
                ) from e
            raise RecipeHubError(
                f"could not download {where} and there is no cached copy: {_cause(e)}. Check your "
                "connection and HF_ENDPOINT, then try again."
            ) from e
        except errors["RepositoryNotFoundError"] as e:
            raise RecipeNotFoundError(
                f"Hub repository '{repo_id}' was not found (or it is private or gated and no valid token "
                "was sent). Check the name, or log in with `hf auth login` / pass token=."
            ) from e
        except errors["RevisionNotFoundError"] as e:
            raise RecipeNotFoundError(
                f"revision '{revision}' does not exist in Hub repository '{repo_id}'. Pass an existing "
                "branch, tag or commit sha (see huggingface_hub.HfApi().list_repo_refs)."
            ) from e
        except errors["EntryNotFoundError"] as e:
            available = _list_safetensors(repo_id, revision, token)
            hint = (
                f" Recipe files there: {', '.join(available)}; load one as '{repo_id}/<file>'."
                if available
                else " Push one with Recipe.push_to_hub, or pass filename= for another file name."
            )
            raise RecipeNotFoundError(f"there is no {where}.{hint}") from e
        except errors["HfHubHTTPError"] as e:
            raise RecipeHubError(
                f"the Hub failed while downloading {where}: {_cause(e)}. This is a server-side "
                "problem: try again later (a cached copy is used automatically when one exists)."
            ) from e
        except errors["transport"] as e:
            raise RecipeHubError(
                f"could not reach the Hub to download {where}: {_cause(e)}. Check your connection and HF_ENDPOINT."
            ) from e
        return cls._load_file(Path(path), display=f"{where}")

    @classmethod
    def _load_local(cls, path: Path) -> "Recipe":
        if path.is_dir():
            default = path / DEFAULT_FILENAME
            if default.is_file():
                path = default
            else:
                files = sorted(path.glob("*.safetensors"))
                if len(files) != 1:
                    raise RecipeNotFoundError(
                        f"'{path}' is a directory without {DEFAULT_FILENAME}"
                        + (f" and with several .safetensors files ({', '.join(f.name for f in files)}): pass one of them"
                           if files else " or any .safetensors file: pass the path of a recipe file")
                    )
                path = files[0]
        return cls._load_file(path, display=f"recipe file '{path}'")

    @classmethod
    def _load_file(cls, path: Path, display: str) -> "Recipe":
        header, metadata = _read_header(path, display)
        _check_format(metadata, display)
        tensors_meta = {k: v for k, v in header.items() if k != "__metadata__"}
        dims = _check_metadata_ints(metadata, display)
        _check_tensor_headers(tensors_meta, dims, display)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for any inconsistency
            raise RecipeFileError(
                f"{display} has a valid header but its tensor data cannot be read ({e}); the file is "
                f"probably truncated or corrupt. {_WHAT_TO_DO_REGENERATE}"
            ) from None
        try:
            provenance = json.loads(metadata["provenance"])
        except json.JSONDecodeError as e:
            raise RecipeSchemaError(f"{display}: metadata 'provenance' is not valid JSON ({e}). {_WHAT_TO_DO_REGENERATE}") from None
        try:
            quality = json.loads(metadata.get("quality", "{}") or "{}")
        except json.JSONDecodeError as e:
            raise RecipeSchemaError(f"{display}: metadata 'quality' is not valid JSON ({e}). {_WHAT_TO_DO_REGENERATE}") from None
        extra = {k: v for k, v in metadata.items() if k not in _KNOWN_METADATA}
        try:
            recipe = cls(
                model_type=metadata["model_type"],
                num_hidden_layers=dims["num_hidden_layers"],
                num_key_value_heads=dims["num_key_value_heads"],
                head_dim=dims["head_dim"],
                rotation=metadata["rotation"],
                source_model=metadata.get("source_model", ""),
                source_revision=metadata.get("source_revision") or None,
                provenance=provenance,
                quality=quality,
                created_with=metadata.get("created_with", "unknown"),
                extra_metadata=extra,
                **tensors,
            )
        except RecipeSchemaError as e:
            raise RecipeSchemaError(f"{display}: {e}. {_WHAT_TO_DO_REGENERATE}") from None
        logger.debug("loaded %s (%s, %d layers)", display, recipe.model_type, recipe.num_hidden_layers)
        return recipe

    # -- saving ----------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as stored in the file (optional ones only when set)."""
        out = {}
        for name in _TENSORS:
            t = getattr(self, name)
            if t is not None:
                out[name] = t.contiguous()
        return out

    def metadata(self) -> dict[str, str]:
        """The string metadata as stored in the file."""
        md = dict(self.extra_metadata)
        md.update(
            {
                "format": FORMAT_NAME,
                "format_version": str(FORMAT_VERSION),
                "model_type": self.model_type,
                "num_hidden_layers": str(self.num_hidden_layers),
                "num_key_value_heads": str(self.num_key_value_heads),
                "head_dim": str(self.head_dim),
                "source_model": self.source_model,
                "provenance": json.dumps(self.provenance, sort_keys=True),
                "quality": json.dumps(self.quality, sort_keys=True),
                "rotation": self.rotation,
                "created_with": self.created_with,
            }
        )
        if self.source_revision:
            md["source_revision"] = self.source_revision
        return md

    def to_bytes(self) -> bytes:
        """The recipe file's bytes (deterministic: equal recipes give equal bytes)."""
        from safetensors.torch import save

        self.validate()  # fields may have been edited since construction
        return _canonical_header(save(self.tensors(), metadata=self.metadata()))

    def save(self, path: "str | os.PathLike[str]") -> Path:
        """Write the recipe to ``path`` (a ``.safetensors`` file) and return the path."""
        p = Path(path).expanduser()
        if p.suffix != ".safetensors":
            logger.warning("saving recipe to '%s': recipe files normally end in .safetensors", p)
        data = self.to_bytes()
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return p

    # -- Hub upload ------------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        filename: str | None = None,
        private: bool = False,
        commit_message: str = "Upload tqpatch recipe",
        token: str | bool | None = None,
        *,
        revision: str | None = None,
        model_card: bool = True,
    ) -> "CommitInfo":
        """Upload the recipe (and a ``README.md`` model card) to a Hub model repo in one commit.

        The repo is created if needed. The model card has YAML front matter (``library_name:
        tqpatch``, ``base_model``, tags ``tqpatch``, ``turboquant``, ``kv-cache``), the per-layer
        table and the measured quality; it replaces an existing ``README.md``.

        Args:
            repo_id: ``"org/repo"``.
            filename: path in the repo (default ``recipe.safetensors``); must end in ``.safetensors``.
            private: create the repo as private (an existing repo keeps its visibility).
            commit_message: the commit message.
            token: Hub token with write access (default: the logged-in token).
            revision: branch to commit to (default ``main``).
            model_card: also write ``README.md``.

        Returns:
            huggingface_hub's ``CommitInfo``; ``.oid`` is the new commit sha (a revision that
            :meth:`from_hub` accepts).

        Raises:
            RecipeHubError: the Hub rejected the upload or could not be reached.
        """
        from huggingface_hub import CommitOperationAdd, HfApi

        fname = filename or DEFAULT_FILENAME
        if not fname.endswith(".safetensors"):
            raise ValueError(f"filename must end in .safetensors, got {fname!r}")
        errors = _hub_errors()
        api = HfApi(token=token)
        ops = [CommitOperationAdd(path_in_repo=fname, path_or_fileobj=self.to_bytes())]
        if model_card:
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=self.model_card(repo_id, fname).encode()))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision)
        except errors["HfHubHTTPError"] as e:
            raise RecipeHubError(
                f"uploading '{fname}' to Hub repo '{repo_id}' failed: {_cause(e)}. Check that your token "
                "has write access to the repo (`hf auth login`, token=), and try again if the server failed."
            ) from e
        except errors["transport"] as e:
            raise RecipeHubError(
                f"could not reach the Hub to upload '{fname}' to '{repo_id}': {_cause(e)}. Check your "
                "connection and HF_ENDPOINT (and unset HF_HUB_OFFLINE)."
            ) from e
        logger.info("pushed %s to %s (commit %s)", fname, repo_id, getattr(info, "oid", "?"))
        return info

    def model_card(self, repo_id: str | None = None, filename: str = DEFAULT_FILENAME) -> str:
        """The ``README.md`` text that :meth:`push_to_hub` uploads."""
        lines = ["---", "library_name: tqpatch"]
        if self.source_model:
            lines.append(f"base_model: {json.dumps(self.source_model)}")
        lines += ["tags:", "- tqpatch", "- turboquant", "- kv-cache", "---", ""]
        title = self.source_model or self.model_type
        lines += [f"# tqpatch recipe for {title}", ""]
        lines += [
            "A tqpatch recipe: per-layer settings for compressing the K/V cache "
            "of this model with TurboQuant (arXiv 2504.19874): packed codes plus one scale per vector.",
            "",
            "## Usage",
            "",
            "```python",
            "import tqpatch",
            f"tqpatch.apply(model, recipe=\"{(repo_id + '/' + filename) if repo_id else filename}\")",
            "```",
            "",
            "## Summary",
            "",
            "| field | value |",
            "|---|---|",
        ]
        k, v = self._side_bits(2)
        summary = [
            ("model_type", self.model_type),
            ("layers", self.num_hidden_layers),
            ("KV heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("rotation", self.rotation),
            ("average bits per stored value (codes + fp16 scales)", f"{self.average_bits():.3f} (keys {k:.3f}, values {v:.3f})"),
            ("provenance", self.provenance.get("kind")),
            ("created with", f"tqpatch {self.created_with}"),
        ]
        if self.source_revision:
            summary.insert(1, ("source revision", self.source_revision))
        lines += [f"| {_md(a)} | {_md(b)} |" for a, b in summary]
        lines += ["", "## Per-layer settings", ""]
        lines += ["| layers | key bits | value bits | key outliers | value outliers | window | key smoothing |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for label, row in self._grouped_rows():
            lines.append("| " + " | ".join(_md(x) for x in (label, *row)) + " |")
        lines += ["", "## Measured quality", ""]
        flat = _flatten(self.quality)
        if flat:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {_md(a)} | {_md(b)} |" for a, b in flat]
        else:
            lines.append("No quality measurements are recorded in this recipe.")
        lines += ["", "## Provenance", "", "```json", json.dumps(self.provenance, indent=2, sort_keys=True), "```", ""]
        return "\n".join(lines)

    # -- model checks ----------------------------------------------------------------------------
    def validate_for(self, config_or_model: Any) -> None:
        """Check that this recipe fits a model.

        Args:
            config_or_model: a transformers config or a model with ``.config``.

        Raises:
            RecipeMismatchError: naming each differing field (``model_type``,
                ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``) with both values.
        """
        shape = _model_shape(config_or_model)
        cfg_types = {_norm_type(t) for t in shape["model_types"]}
        mismatches: dict[str, tuple[Any, Any]] = {}
        if _norm_type(self.model_type) not in cfg_types:
            mismatches["model_type"] = (self.model_type, shape["model_type"])
        for name in ("num_hidden_layers", "num_key_value_heads", "head_dim"):
            if getattr(self, name) != shape[name]:
                mismatches[name] = (getattr(self, name), shape[name])
        if mismatches:
            what = "; ".join(f"{k}: recipe {a!r}, model {b!r}" for k, (a, b) in mismatches.items())
            made_for = self.source_model or self.model_type
            raise RecipeMismatchError(
                f"this recipe (made for {made_for}) does not fit the model: {what}. Use a recipe made for "
                "this model (tqpatch.list_recipes(), `tqpatch calibrate`), or "
                "tqpatch.Recipe.uniform(model.config).",
                mismatches,
            )

    # -- queries ---------------------------------------------------------------------------------
    def apply_settings(self, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The recipe as the per-layer settings dict that :func:`tqpatch.apply` works from.

        Returns a copy of ``settings`` with ``key_bits``, ``value_bits``, ``window``, ``seed``
        (lists of ints, one per layer) and ``rotation`` replaced by the recipe's values,
        ``key_channel_scale`` (``float32 [L, H, d]``) set or removed, and, when the recipe splits
        channels, ``key_outliers`` / ``value_outliers``: one entry per layer, ``None`` or
        ``(channels int64 [H, n], outlier_bits)``.
        """
        out = dict(settings or {})
        out.update(
            key_bits=[int(b) for b in self.key_bits.tolist()],
            value_bits=[int(b) for b in self.value_bits.tolist()],
            window=[int(w) for w in self.window.tolist()],
            seed=[int(s) for s in self.rotation_seed.tolist()],
            rotation=self.rotation,
        )
        if self.key_channel_scale is not None:
            out["key_channel_scale"] = self.key_channel_scale.clone()
        else:
            out.pop("key_channel_scale", None)
        for kind in ("key", "value"):
            out.pop(f"{kind}_outliers", None)
            if getattr(self, f"{kind}_outlier_channels") is None:
                continue
            per_layer = []
            for i in range(self.num_hidden_layers):
                s = self.layer(i)
                ch = s.key_outlier_channels if kind == "key" else s.value_outlier_channels
                ob = s.key_outlier_bits if kind == "key" else s.value_outlier_bits
                per_layer.append(None if ch is None else (ch, ob))
            if any(x is not None for x in per_layer):
                out[f"{kind}_outliers"] = per_layer
        return out

    def layer(self, index: int) -> LayerSettings:
        """The settings of layer ``index`` (negative indices count from the end)."""
        L = self.num_hidden_layers
        if not -L <= index < L:
            raise IndexError(f"layer {index} out of range for a recipe of {L} layers")
        i = index % L

        def split(kind: str) -> tuple[torch.Tensor | None, int]:
            ch = getattr(self, f"{kind}_outlier_channels")
            if ch is None:
                return None, 0
            ob = int(getattr(self, f"{kind}_outlier_bits")[i])
            if ob == 0 or int(getattr(self, f"{kind}_bits")[i]) == BF16_BITS:
                return None, 0
            return ch[i].to(torch.int64), ob

        kc, kob = split("key")
        vc, vob = split("value")
        return LayerSettings(
            key_bits=int(self.key_bits[i]),
            value_bits=int(self.value_bits[i]),
            key_outlier_channels=kc,
            key_outlier_bits=kob,
            value_outlier_channels=vc,
            value_outlier_bits=vob,
            rotation_seed=int(self.rotation_seed[i]),
            window=int(self.window[i]),
            key_channel_scale=None if self.key_channel_scale is None else self.key_channel_scale[i].clone(),
        )

    def bits_per_layer(self, scale_bytes: int = 2) -> torch.Tensor:
        """Stored bits per value, ``float64 [L, 2]`` (keys, values), counting the codes and the
        scale of every vector (``scale_bytes`` each; a split layer stores two scales per vector);
        bf16 layers count 16."""
        d = self.head_dim
        out = torch.empty(self.num_hidden_layers, 2, dtype=torch.float64)
        for col, kind in enumerate(("key", "value")):
            for i in range(self.num_hidden_layers):
                s = self.layer(i)
                b = s.key_bits if kind == "key" else s.value_bits
                if b == BF16_BITS:
                    out[i, col] = 16.0
                    continue
                ch = s.key_outlier_channels if kind == "key" else s.value_outlier_channels
                if ch is None:
                    out[i, col] = (d * b + 8 * scale_bytes) / d
                else:
                    n = ch.shape[-1]
                    ob = s.key_outlier_bits if kind == "key" else s.value_outlier_bits
                    out[i, col] = (n * ob + (d - n) * b + 2 * 8 * scale_bytes) / d
        return out

    def _side_bits(self, scale_bytes: int) -> tuple[float, float]:
        m = self.bits_per_layer(scale_bytes).mean(0)
        return float(m[0]), float(m[1])

    def average_bits(self, scale_bytes: int = 2, context_length: int | None = None) -> float:
        """Average stored bits per cached K/V value over all layers, keys and values.

        Counts the packed codes and the per-vector scales (``scale_bytes`` bytes each: 2 for the
        fp16 scales of the cache; two scales per vector in a split layer); bf16 layers count 16.
        E.g. 4-bit codes with d = 128 cost ``(128*4 + 16) / 128 = 4.125`` bits per value.

        Args:
            scale_bytes: bytes per stored scale.
            context_length: if given, the full-precision window is counted too: in a layer with
                window ``w``, ``min(w, T)`` of ``T`` tokens cost 16 bits. Default: not counted
                (the window is a constant number of tokens).
        """
        if scale_bytes < 0:
            raise ValueError(f"scale_bytes must be >= 0, got {scale_bytes}")
        bits = self.bits_per_layer(scale_bytes)
        if context_length is not None:
            if context_length < 1:
                raise ValueError(f"context_length must be >= 1, got {context_length}")
            w = torch.clamp(self.window.to(torch.float64), max=float(context_length)).unsqueeze(1)
            bits = (w * 16.0 + (context_length - w) * bits) / context_length
        return float(bits.mean())

    def _grouped_rows(self) -> list[tuple[str, tuple[str, ...]]]:
        def outl(ch: torch.Tensor | None, b: int) -> str:
            return "-" if ch is None else f"{ch.shape[-1]} ch @ {b} bits"

        rows = []
        for i in range(self.num_hidden_layers):
            s = self.layer(i)
            rows.append(
                (
                    _fmt_bits(s.key_bits),
                    _fmt_bits(s.value_bits),
                    outl(s.key_outlier_channels, s.key_outlier_bits),
                    outl(s.value_outlier_channels, s.value_outlier_bits),
                    str(s.window),
                    "yes" if s.key_channel_scale is not None and s.key_bits != BF16_BITS
                    and not bool((s.key_channel_scale == 1).all()) else "-",
                )
            )
        groups: list[tuple[str, tuple[str, ...]]] = []
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[start]:
                label = str(start) if i - 1 == start else f"{start}-{i - 1}"
                groups.append((label, rows[start]))
                start = i
        return groups

    def to_table(self) -> str:
        """A readable text table: model, provenance, average bits, per-layer settings (runs of
        equal layers grouped) and the measured quality."""
        k, v = self._side_bits(2)
        seeds = self.rotation_seed.tolist()
        if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
            offset = "" if seeds[0] == 0 else f"{seeds[0]} + "
            seed_txt = f"{seeds[0]}..{seeds[-1]} (seed = {offset}layer index)"
        else:
            seed_txt = ", ".join(map(str, seeds))
        head = [
            f"tqpatch recipe: {self.model_type}, {self.num_hidden_layers} layers, "
            f"{self.num_key_value_heads} KV heads, head_dim {self.head_dim}",
            f"source model:   {self.source_model or '-'}" + (f" @ {self.source_revision}" if self.source_revision else ""),
            f"provenance:     {self.provenance.get('kind')}",
        ]
        ref = self.provenance.get("reference")
        if isinstance(ref, str) and ref:
            head += textwrap.wrap(ref, width=100, initial_indent="reference:      ", subsequent_indent=" " * 16)
        head += [
            f"rotation:       {self.rotation}, seeds {seed_txt}",
            f"average bits:   {self.average_bits():.3f} per stored value, codes + fp16 scales "
            f"(keys {k:.3f}, values {v:.3f})",
            f"created with:   tqpatch {self.created_with}",
            "",
        ]
        header = ("layers", "K bits", "V bits", "K outliers", "V outliers", "window", "K smoothing")
        body = [(label, *row) for label, row in self._grouped_rows()]
        widths = [max(len(str(r[c])) for r in [header, *body]) for c in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        table = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        table += [fmt.format(*r) for r in body]
        flat = _flatten(self.quality)
        tail = ["", "quality:"] + [f"  {a}: {b}" for a, b in flat] if flat else ["", "quality: (none recorded)"]
        return "\n".join(head + [t.rstrip() for t in table] + tail)

    # -- dunder ----------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recipe):
            return NotImplemented
        for name in _TENSORS:
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None):
                return False
            if a is not None and (a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b)):
                return False
        return self.metadata() == other.metadata()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Recipe(model_type={self.model_type!r}, layers={self.num_hidden_layers}, "
            f"kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
            f"average_bits={self.average_bits():.3f}, provenance={self.provenance.get('kind')!r}, "
            f"source_model={self.source_model!r})"
        )


# ------------------------------------------------------------------------------------------------
# bundled recipes
# ------------------------------------------------------------------------------------------------
def _bundled_names() -> list[str]:
    try:
        root = importlib.resources.files(_BUNDLED_PACKAGE)
    except ModuleNotFoundError:
        return []
    return sorted(p.name[: -len(".safetensors")] for p in root.iterdir() if p.name.endswith(".safetensors"))


def list_recipes() -> list[str]:
    """Names of the recipes bundled with tqpatch (load one with ``Recipe.load(name)``)."""
    return _bundled_names()


# ------------------------------------------------------------------------------------------------
# helpers: configs
# ------------------------------------------------------------------------------------------------
def _config_of(config_or_model: Any) -> Any:
    cfg = config_or_model
    if not hasattr(cfg, "num_hidden_layers") and hasattr(cfg, "config"):
        cfg = cfg.config
    if hasattr(cfg, "to_dict") or hasattr(cfg, "num_hidden_layers") or hasattr(cfg, "get_text_config"):
        return cfg
    raise TypeError(f"expected a transformers config or model, got {type(config_or_model).__name__}")


def _model_shape(config_or_model: Any) -> dict[str, Any]:
    cfg = _config_of(config_or_model)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None)
    if not head_dim:
        hidden = getattr(text, "hidden_size", None)
        if hidden is None or not heads:
            raise ValueError("the config has neither head_dim nor hidden_size and num_attention_heads")
        head_dim = hidden // heads
    if layers is None or kv is None:
        raise ValueError("the config lacks num_hidden_layers or num_key_value_heads/num_attention_heads")
    types = [t for t in (getattr(cfg, "model_type", None), getattr(text, "model_type", None)) if t]
    if not types:
        raise ValueError("the config has no model_type")
    return {
        "model_type": types[0],
        "model_types": types,
        "num_hidden_layers": int(layers),
        "num_key_value_heads": int(kv),
        "head_dim": int(head_dim),
    }


def _norm_type(t: str) -> str:
    return t[: -len("_text")] if t.endswith("_text") else t


# ------------------------------------------------------------------------------------------------
# helpers: file parsing
# ------------------------------------------------------------------------------------------------
def _read_header(path: Path, display: str) -> tuple[dict, dict[str, str]]:
    """Parse the safetensors header ourselves first, for precise error messages (and so that a
    multi-gigabyte model file passed by mistake is rejected without reading it)."""
    not_st = (
        f"{display} is not a safetensors file"
    )
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise RecipeFileError(
                    f"{not_st}: it has only {size} bytes. {_WHAT_TO_DO_REGENERATE}"
                )
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER_BYTES or n > size - 8:
                raise RecipeFileError(
                    f"{not_st} (or it is truncated): its first 8 bytes announce a {n}-byte header in a "
                    f"{size}-byte file. Recipes are .safetensors files written by tqpatch. {_WHAT_TO_DO_REGENERATE}"
                )
            raw = f.read(n)
    except OSError as e:
        raise RecipeFileError(f"cannot read {display}: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeFileError(
            f"{not_st} or it is corrupt: its header is not valid JSON ({e}). {_WHAT_TO_DO_REGENERATE}"
        ) from None
    if not isinstance(header, dict):
        raise RecipeFileError(f"{not_st}: its header is not a JSON object. {_WHAT_TO_DO_REGENERATE}")
    metadata = header.get("__metadata__")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RecipeFileError(f"{display}: the safetensors metadata is not a string map. {_WHAT_TO_DO_REGENERATE}")
    return header, metadata


def _check_format(metadata: dict[str, str], display: str) -> int:
    fmt = metadata.get("format")
    if fmt != FORMAT_NAME:
        found = f"format={fmt!r}" if fmt is not None else "no 'format' entry"
        raise NotARecipeError(
            f"{display} is a safetensors file but not a tqpatch recipe: its metadata has {found} instead of "
            f"format='{FORMAT_NAME}' (is it model weights?). Pass a recipe file: a bundled name "
            f"({', '.join(_bundled_names()) or 'none installed'}), a file saved by Recipe.save, or a Hub recipe."
        )
    raw = metadata.get("format_version")
    if raw is None:
        raise RecipeSchemaError(f"{display}: metadata 'format_version' is missing. {_WHAT_TO_DO_REGENERATE}")
    try:
        version = int(raw)
    except ValueError:
        raise RecipeSchemaError(
            f"{display}: metadata format_version={raw!r} is not an integer. {_WHAT_TO_DO_REGENERATE}"
        ) from None
    if version > FORMAT_VERSION:
        raise RecipeVersionError(
            f"{display} uses recipe format version {version} (written by tqpatch "
            f"{metadata.get('created_with', '?')}); this tqpatch ({_tqpatch_version()}) reads versions up to "
            f"{FORMAT_VERSION}. Upgrade tqpatch (pip install -U tqpatch)."
        )
    if version < 1:
        raise RecipeSchemaError(f"{display}: format_version={version} is not valid (versions start at 1).")
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing:
        raise RecipeSchemaError(
            f"{display}: metadata is missing {', '.join(repr(m) for m in missing)}. {_WHAT_TO_DO_REGENERATE}"
        )
    return version


def _check_metadata_ints(metadata: dict[str, str], display: str) -> dict[str, int]:
    out = {}
    for name in ("num_hidden_layers", "num_key_value_heads", "head_dim"):
        raw = metadata[name]
        try:
            v = int(raw)
        except ValueError:
            v = -1
        if v < 1:
            raise RecipeSchemaError(
                f"{display}: metadata {name}={raw!r} is not a positive integer. {_WHAT_TO_DO_REGENERATE}"
            )
        out[name] = v
    return out


def _check_tensor_headers(entries: dict[str, Any], dims: dict[str, int], display: str) -> None:
    L, H, d = dims["num_hidden_layers"], dims["num_key_value_heads"], dims["head_dim"]
    unknown = sorted(set(entries) - set(_TENSORS))
    if unknown:
        raise RecipeSchemaError(
            f"{display}: unknown tensor(s) {unknown}; a recipe (format version {FORMAT_VERSION}) holds only "
            f"{sorted(_TENSORS)}. If a newer tqpatch wrote it, upgrade tqpatch."
        )
    missing = [k for k in _REQUIRED_TENSORS if k not in entries]
    if missing:
        raise RecipeSchemaError(f"{display}: required tensor(s) {missing} missing. {_WHAT_TO_DO_REGENERATE}")
    n_seen: dict[str, int] = {}
    for name, info in entries.items():
        dtype, sym = _TENSORS[name]
        if not isinstance(info, dict):
            raise RecipeFileError(f"{display}: malformed header entry for '{name}'. {_WHAT_TO_DO_REGENERATE}")
        got_dtype, shape = info.get("dtype"), info.get("shape")
        if got_dtype != _DTYPE_NAMES[dtype]:
            got = _ST_DTYPES.get(got_dtype, got_dtype)
            raise RecipeSchemaError(
                f"{display}: tensor '{name}' has dtype {got}, expected {dtype}. {_WHAT_TO_DO_REGENERATE}"
            )
        if not isinstance(shape, list) or len(shape) != len(sym):
            raise RecipeSchemaError(
                f"{display}: tensor '{name}' has shape {shape}, expected {len(sym)} dimensions "
                f"[{', '.join(sym)}]. {_WHAT_TO_DO_REGENERATE}"
            )
        want = {"L": L, "H": H, "d": d}
        for axis, (s, got) in enumerate(zip(sym, shape)):
            if s == "n":
                n_seen[name] = got
                continue
            if got != want[s]:
                label = {"L": "num_hidden_layers", "H": "num_key_value_heads", "d": "head_dim"}[s]
                raise RecipeSchemaError(
                    f"{display}: tensor '{name}' has shape {shape} but axis {axis} must be {label} = {want[s]} "
                    f"(expected [{', '.join(str(want.get(x, 'n')) for x in sym)}]). {_WHAT_TO_DO_REGENERATE}"
                )
    for kind in ("key", "value"):
        if (f"{kind}_outlier_channels" in entries) != (f"{kind}_outlier_bits" in entries):
            have = f"{kind}_outlier_channels" if f"{kind}_outlier_channels" in entries else f"{kind}_outlier_bits"
            raise RecipeSchemaError(
                f"{display}: '{have}' is present without its partner; {kind}_outlier_channels and "
                f"{kind}_outlier_bits come together. {_WHAT_TO_DO_REGENERATE}"
            )


def _canonical_header(data: bytes) -> bytes:
    """Sort the metadata keys in a safetensors header (the library writes them in hash order),
    so equal recipes give byte-identical files. The header keeps its length (space padded)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered: dict[str, Any] = {}
    if meta is not None:
        ordered["__metadata__"] = dict(sorted(meta.items()))
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # never expected; keep the library's bytes
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


# ------------------------------------------------------------------------------------------------
# helpers: Hub
# ------------------------------------------------------------------------------------------------
_HUB_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    if "\\" in ref or ref.startswith(("/", ".", "~")) or "//" in ref:
        return None
    parts = ref.split("/")
    if len(parts) < 2 or not all(_HUB_REPO_PART.match(p) for p in parts[:2]):
        return None
    if len(parts) == 2:
        if ref.endswith(".safetensors"):
            return None  # "dir/file.safetensors": a local path that does not exist
        return ref, None
    if not ref.endswith(".safetensors") or any(p in ("", ".", "..") for p in parts[2:]):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def _no_revision(revision: str | None, ref: str, what: str) -> None:
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies only to Hub references, but '{ref}' is {what}")


def _hub_errors() -> dict[str, Any]:
    from huggingface_hub import errors as e

    transport: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            module = __import__(mod)
            transport.append(getattr(module, attr))
        except (ImportError, AttributeError):
            pass
    return {
        "LocalEntryNotFoundError": e.LocalEntryNotFoundError,
        "RepositoryNotFoundError": e.RepositoryNotFoundError,
        "RevisionNotFoundError": e.RevisionNotFoundError,
        "EntryNotFoundError": e.EntryNotFoundError,
        "HfHubHTTPError": e.HfHubHTTPError,
        "transport": tuple(transport),
    }


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _cause(e: BaseException) -> str:
    """A one-line description of an error and its first cause."""
    parts = []
    cur: BaseException | None = e
    while cur is not None and len(parts) < 3:
        msg = " ".join(str(cur).split())
        parts.append(f"{type(cur).__name__}: {msg}" if msg else type(cur).__name__)
        cur = cur.__cause__
    return " <- ".join(parts)


def _list_safetensors(repo_id: str, revision: str | None, token: str | bool | None) -> list[str]:
    """Best effort: the .safetensors files of a repo (empty when it cannot be listed)."""
    if _hub_offline():
        return []
    try:
        from huggingface_hub import HfApi

        return sorted(f for f in HfApi(token=token).list_repo_files(repo_id, revision=revision) if f.endswith(".safetensors"))
    except Exception as e:  # only improves an error message; never hide the original error
        logger.debug("could not list %s: %s", repo_id, e)
        return []


# ------------------------------------------------------------------------------------------------
# helpers: text
# ------------------------------------------------------------------------------------------------
def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, key + ".")
        elif isinstance(v, float):
            out.append((key, f"{v:.6g}"))
        else:
            out.append((key, json.dumps(v) if not isinstance(v, str) else v))
    return out


def _md(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")
